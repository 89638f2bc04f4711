# VisionClient.Common.ps1
#
# Helpers shared by vision-client.ps1 and vision-caption-folder-images.ps1. Dot-source it:
#     . (Join-Path $PSScriptRoot 'VisionClient.Common.ps1')
# It only defines functions (all named *-Vision*), so the folder script can copy them into the
# runspaces of its worker pool.
#
# Runs on Windows PowerShell 5.1 and PowerShell 7+. Keep this file ASCII only: Windows
# PowerShell 5.1 reads a script without a BOM in the ANSI code page.
#
# HTTP goes through System.Net.Http.HttpClient rather than Invoke-RestMethod, because the two
# PowerShell editions report HTTP errors in different shapes and decode bodies differently;
# HttpClient gives the status code, headers and raw body the same way on both.

function Get-VisionImageExtension {
    # The file types the folder script captions, compared without the dot and in any case.
    return @('jpg', 'jpeg', 'png', 'gif', 'bmp', 'tif', 'tiff', 'webp')
}

function ConvertTo-VisionPrintable {
    # $Text (a file name) on one line, as every report of this project shows names
    # (captionfiles.printable in Python, printable_into in the bash scripts): a line break or tab
    # as \n, \r or \t, any other control character (0x00-0x1F, 0x7F) as \xNN, so a name can
    # neither cut a message short nor pass for a line of its own (nor send a terminal escape).
    param([string]$Text)
    if ($Text -notmatch '[\x00-\x1f\x7f]') { return $Text }
    $shown = [System.Text.StringBuilder]::new($Text.Length + 8)
    foreach ($c in $Text.ToCharArray()) {
        $code = [int]$c
        if ($code -eq 10) { [void]$shown.Append('\n') }
        elseif ($code -eq 13) { [void]$shown.Append('\r') }
        elseif ($code -eq 9) { [void]$shown.Append('\t') }
        elseif ($code -lt 32 -or $code -eq 127) { [void]$shown.Append(('\x{0:x2}' -f $code)) }
        else { [void]$shown.Append($c) }
    }
    return $shown.ToString()
}

function Resolve-VisionBaseUrl {
    # -Url, else $env:VISION_HOST, else the default. 'host:port' gets http:// in front.
    param([string]$Url)
    $value = $Url
    if ([string]::IsNullOrWhiteSpace($value)) { $value = $env:VISION_HOST }
    if ([string]::IsNullOrWhiteSpace($value)) { $value = 'http://127.0.0.1:54880' }
    $value = $value.Trim().TrimEnd('/')
    if ($value -notmatch '^[A-Za-z][A-Za-z0-9+.-]*://') { $value = 'http://' + $value }
    $parsed = $null
    if (-not [System.Uri]::TryCreate($value, [System.UriKind]::Absolute, [ref]$parsed) -or
        ($parsed.Scheme -ne 'http' -and $parsed.Scheme -ne 'https')) {
        throw ("Invalid server URL '{0}': expected something like http://127.0.0.1:54880" -f $value)
    }
    return $value
}

function ConvertTo-VisionTask {
    # 'caption', 'CAPTION' and '<CAPTION>' all become '<CAPTION>', the token the server wants.
    param([string]$Prompt)
    $token = ''
    if ($null -ne $Prompt) { $token = $Prompt.Trim() }
    if ($token.StartsWith('<')) { $token = $token.Substring(1) }
    if ($token.EndsWith('>')) { $token = $token.Substring(0, $token.Length - 1) }
    $token = $token.Trim()
    if ($token.Length -eq 0) { throw 'The prompt is empty; try CAPTION, DETAILED_CAPTION or GENERATE_TAGS.' }
    return '<' + $token.ToUpperInvariant() + '>'
}

function Test-VisionResizeSupported {
    # System.Drawing only works on Windows (.NET 6+ throws PlatformNotSupportedException elsewhere).
    if ($PSVersionTable.PSVersion.Major -ge 6 -and -not $IsWindows) { return $false }
    return $true
}

function Get-VisionResizeUnsupportedMessage {
    return ('-MaxSize resizes with System.Drawing, which works only on Windows, and this is ' +
        'PowerShell {0} on another system. Leave out -MaxSize: the server takes the original ' +
        'file and resizes it itself.') -f $PSVersionTable.PSVersion
}

function New-VisionHttpClient {
    # One client per run, shared by all requests (HttpClient is thread safe and reuses connections).
    param([int]$TimeoutSec = 300, [int]$MaxConnections = 1)
    if ($PSVersionTable.PSVersion.Major -lt 6) {
        Add-Type -AssemblyName System.Net.Http
        # .NET Framework allows only 2 connections per host by default, which would cap -Jobs.
        if ([System.Net.ServicePointManager]::DefaultConnectionLimit -lt $MaxConnections) {
            [System.Net.ServicePointManager]::DefaultConnectionLimit = $MaxConnections
        }
        $tls12 = [System.Net.SecurityProtocolType]::Tls12
        [System.Net.ServicePointManager]::SecurityProtocol = [System.Net.ServicePointManager]::SecurityProtocol -bor $tls12
    }
    $handler = [System.Net.Http.HttpClientHandler]::new()
    $client = [System.Net.Http.HttpClient]::new($handler)
    if ($TimeoutSec -gt 0) {
        $client.Timeout = [System.TimeSpan]::FromSeconds($TimeoutSec)
    }
    else {
        $client.Timeout = [System.Threading.Timeout]::InfiniteTimeSpan
    }
    # .NET Framework would otherwise send 'Expect: 100-continue' and wait before every body.
    $client.DefaultRequestHeaders.ExpectContinue = $false
    $client.DefaultRequestHeaders.UserAgent.ParseAdd('vision-client-ps/1.0')
    return $client
}

function Get-VisionInnermostMessage {
    param($Exception)
    $message = ''
    $current = $Exception
    while ($null -ne $current) {
        if (-not [string]::IsNullOrWhiteSpace($current.Message)) { $message = $current.Message }
        $current = $current.InnerException
    }
    return $message.Trim()
}

function Test-VisionTimeoutException {
    param($Exception)
    $current = $Exception
    while ($null -ne $current) {
        if ($current -is [System.OperationCanceledException] -or $current -is [System.TimeoutException]) {
            return $true
        }
        $current = $current.InnerException
    }
    return $false
}

function Test-VisionNotUpYet {
    # Whether a failed connection is a server that is not up yet (nothing listens, the host does
    # not answer), not a wrong address (a name that does not resolve, TLS trouble): the folder
    # script waits at the start for the first kind only, as vision-caption-folder-images.sh does.
    param($Exception)
    $waitable = @('ConnectionRefused', 'TimedOut', 'HostUnreachable', 'NetworkUnreachable', 'HostDown')
    $current = $Exception
    while ($null -ne $current) {
        if ($current -is [System.Net.Sockets.SocketException]) {
            return ($waitable -contains [string]$current.SocketErrorCode)
        }
        $current = $current.InnerException
    }
    return $false
}

function Test-VisionSpeaksHttps {
    # Whether an http:// URI's port completes a TLS handshake, the certificate unchecked: this only
    # asks which protocol the port speaks, and nothing is sent over it (as the other clients do).
    # The synchronous handshake runs the validation script block on this thread (an async one
    # would call it on a thread without a runspace); socket timeouts bound it to 5 s.
    param([string]$Uri)
    $parsed = [System.Uri]$Uri
    if ($parsed.Scheme -ne 'http') { return $false }
    $tcp = [System.Net.Sockets.TcpClient]::new()
    try {
        if (-not $tcp.ConnectAsync($parsed.DnsSafeHost, $parsed.Port).Wait(5000)) { return $false }
        $tcp.ReceiveTimeout = 5000
        $tcp.SendTimeout = 5000
        $anyCertificate = [System.Net.Security.RemoteCertificateValidationCallback] { $true }
        $ssl = [System.Net.Security.SslStream]::new($tcp.GetStream(), $false, $anyCertificate)
        try {
            $ssl.AuthenticateAsClient($parsed.DnsSafeHost)
            return $true
        }
        finally { $ssl.Dispose() }
    }
    catch { return $false }
    finally { $tcp.Dispose() }
}

function ConvertFrom-VisionRetryAfter {
    # A Retry-After header in seconds, or $null when it cannot be read, by the rules of every
    # client (vision_server/client/retry.py; retry_after_into in vision-client.sh): a number of
    # seconds, its fraction kept, 0 or less meaning at once; or an HTTP date in any of the three
    # forms RFC 9110 has recipients read, the seconds from now until then (0 when it is past):
    # "Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT" (a two-digit year is 19YY
    # from 69 on, else 20YY, as Python reads it) and "Sun Nov  6 08:49:37 1994" (in UTC). A date
    # that does not exist (31 Feb, 08:49:60) is no hint. The weekday is not checked, as in Python.
    param([string]$Text)
    if ($null -eq $Text) { return $null }
    $Text = $Text.Trim()
    if ($Text -cmatch '^[+-]?([0-9]+([.][0-9]*)?|[.][0-9]+)$') {
        $seconds = [double]::Parse($Text, [System.Globalization.CultureInfo]::InvariantCulture)
        return [Math]::Max(0.0, $seconds)
    }
    $weekday = '(Mon|Tue|Wed|Thu|Fri|Sat|Sun)'
    $month = '(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)'
    $clock = '([0-9]{2}):([0-9]{2}):([0-9]{2})'
    if ($Text -cmatch ('^' + $weekday + ', ([0-9]{2}) ' + $month + ' ([0-9]{4}) ' + $clock + ' GMT$')) {
        $day = [int]$Matches[2]; $monthName = $Matches[3]; $year = [int]$Matches[4]
        $hour = [int]$Matches[5]; $minute = [int]$Matches[6]; $second = [int]$Matches[7]
    }
    elseif ($Text -cmatch ('^(Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day, ([0-9]{2})-' + $month + '-([0-9]{2}) ' + $clock + ' GMT$')) {
        $day = [int]$Matches[2]; $monthName = $Matches[3]; $year = [int]$Matches[4]
        $hour = [int]$Matches[5]; $minute = [int]$Matches[6]; $second = [int]$Matches[7]
        if ($year -gt 68) { $year += 1900 } else { $year += 2000 }
    }
    elseif ($Text -cmatch ('^' + $weekday + ' ' + $month + ' +([0-9]{1,2}) ' + $clock + ' ([0-9]{4})$')) {
        $monthName = $Matches[2]; $day = [int]$Matches[3]
        $hour = [int]$Matches[4]; $minute = [int]$Matches[5]; $second = [int]$Matches[6]; $year = [int]$Matches[7]
    }
    else {
        return $null
    }
    $months = @('Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec')
    $monthNumber = [Array]::IndexOf($months, $monthName) + 1
    try {
        $when = [System.DateTimeOffset]::new($year, $monthNumber, $day, $hour, $minute, $second, [System.TimeSpan]::Zero)
    }
    catch { return $null }
    return [Math]::Max(0.0, ($when - [System.DateTimeOffset]::UtcNow).TotalSeconds)
}

function Invoke-VisionHttp {
    # Sends one request. Returns StatusCode, Body (text), RetryAfter (seconds or $null) and
    # Reason for any HTTP answer, including 4xx/5xx. Throws only when no answer came back; the
    # exception's Data['VisionFailure'] is 'timeout', 'connect' or 'scheme' (http:// to a port
    # that speaks HTTPS).
    param(
        $Client,
        [string]$Method,
        [string]$Uri,
        [string]$Body,
        [string]$ApiKey,
        [int]$TimeoutSec = 0
    )
    $request = [System.Net.Http.HttpRequestMessage]::new([System.Net.Http.HttpMethod]::new($Method), $Uri)
    $cancel = [System.Threading.CancellationTokenSource]::new()
    $task = $null
    $response = $null
    try {
        $request.Headers.Accept.ParseAdd('application/json')
        if (-not [string]::IsNullOrEmpty($ApiKey)) {
            $request.Headers.Authorization = [System.Net.Http.Headers.AuthenticationHeaderValue]::new('Bearer', $ApiKey)
        }
        if ($Method -eq 'POST') {
            $request.Content = [System.Net.Http.StringContent]::new($Body, [System.Text.Encoding]::UTF8, 'application/json')
        }
        $task = $Client.SendAsync($request, $cancel.Token)
        # Wait in short slices so Ctrl+C (or stopping a worker) is noticed between them.
        # Task.WaitAny does not throw for a failed task; GetResult below throws the original
        # exception, which has the useful message.
        $pending = [System.Threading.Tasks.Task[]]@($task)
        while ([System.Threading.Tasks.Task]::WaitAny($pending, 200) -lt 0) { }
        try {
            $response = $task.GetAwaiter().GetResult()
        }
        catch {
            $inner = $_.Exception
            if (Test-VisionTimeoutException $inner) {
                $limit = ''
                if ($TimeoutSec -gt 0) { $limit = ' within {0} s' -f $TimeoutSec }
                $text = 'Timeout: no answer from {0}{1} (raise -TimeoutSec; a first request may be waiting for the model to load)' -f $Uri, $limit
                $failure = [System.Exception]::new($text)
                $failure.Data['VisionFailure'] = 'timeout'
            }
            elseif (-not (Test-VisionNotUpYet $inner) -and (Test-VisionSpeaksHttps $Uri)) {
                # Plain HTTP to a TLS port is hung up on; every retry would be too.
                $https = 'https://' + $Uri.Substring('http://'.Length)
                $text = 'Cannot reach the server at {0}: it hung up without an answer, and that port speaks HTTPS: use {1}' -f $Uri, $https
                $failure = [System.Exception]::new($text)
                $failure.Data['VisionFailure'] = 'scheme'
                $failure.Data['VisionNotUpYet'] = $false
            }
            else {
                $text = 'Cannot reach the server at {0}: {1}' -f $Uri, (Get-VisionInnermostMessage $inner)
                $failure = [System.Exception]::new($text)
                $failure.Data['VisionFailure'] = 'connect'
                $failure.Data['VisionNotUpYet'] = (Test-VisionNotUpYet $inner)
            }
            throw $failure
        }
        $bytes = $response.Content.ReadAsByteArrayAsync().GetAwaiter().GetResult()
        $text = [System.Text.Encoding]::UTF8.GetString($bytes)
        # The header as sent: .NET's own RetryAfter reads whole seconds only ("2.5" was no hint).
        $retryAfter = $null
        $values = $null
        if ($response.Headers.TryGetValues('Retry-After', [ref]$values)) {
            $retryAfter = ConvertFrom-VisionRetryAfter (@($values)[-1])
        }
        return [pscustomobject]@{
            StatusCode = [int]$response.StatusCode
            Body       = $text
            RetryAfter = $retryAfter
            Reason     = $response.ReasonPhrase
        }
    }
    finally {
        if ($null -ne $task -and -not $task.IsCompleted) { $cancel.Cancel() }
        if ($null -ne $response) { $response.Dispose() }
        $request.Dispose()
        $cancel.Dispose()
    }
}

function Get-VisionErrorMessage {
    # Turns an HTTP error answer into one line, with the server's own message when it sent one:
    # native API {"detail": ...}, OpenAI-style {"error": {"message": ...}}, else the raw body.
    param($Response)
    $detail = $null
    $parsed = $null
    if (-not [string]::IsNullOrWhiteSpace($Response.Body)) {
        try { $parsed = ConvertFrom-Json -InputObject $Response.Body -ErrorAction Stop } catch { $parsed = $null }
    }
    if ($null -ne $parsed) {
        if ($parsed -is [string]) {
            $detail = $parsed
        }
        elseif ($null -ne $parsed.detail) {
            if ($parsed.detail -is [string]) { $detail = $parsed.detail }
            else { $detail = ConvertTo-Json -InputObject $parsed.detail -Compress -Depth 6 }
        }
        elseif ($null -ne $parsed.error) {
            if ($parsed.error -is [string]) { $detail = $parsed.error }
            elseif ($null -ne $parsed.error.message) { $detail = [string]$parsed.error.message }
        }
    }
    if ([string]::IsNullOrWhiteSpace($detail)) {
        $detail = ([string]$Response.Body).Trim()
        if ($detail.Length -gt 500) { $detail = $detail.Substring(0, 500) + '...' }
    }
    if ([string]::IsNullOrWhiteSpace($detail)) { $detail = [string]$Response.Reason }
    # "HTTP 400: message", as vision-client.sh and vision-client write it.
    $message = 'HTTP {0}: {1}' -f $Response.StatusCode, $detail
    if ($Response.StatusCode -eq 401) {
        $message += ' (set $env:VISION_API_KEY or -ApiKey)'
    }
    elseif ($null -ne $Response.RetryAfter) {
        $message += ' (server asked to retry after {0:N0} s)' -f $Response.RetryAfter
    }
    return $message
}

function Test-VisionGatewayOutage {
    # Whether an error answer is a proxy's own "no server behind me" (HAProxy, nginx): 502/503
    # without Retry-After and without a JSON body. A vision-server's 503 (queue full, draining)
    # has both; a 504 is a deadline a server ran past, not an outage.
    param($Response)
    if (@(502, 503) -notcontains $Response.StatusCode) { return $false }
    if ($null -ne $Response.RetryAfter) { return $false }
    return -not ([string]$Response.Body).TrimStart().StartsWith('{')
}

function New-VisionAnswerError {
    # The exception for an HTTP error answer. A proxy with no server behind it counts as an
    # unreachable server (Data['VisionFailure'] = 'connect'), so the folder script waits for it;
    # any other answer keeps its status in Data['VisionStatus'] (the folder script stops on a
    # refused key, a refused prompt or a server still busy after the retries).
    param($Response)
    $message = Get-VisionErrorMessage $Response
    $failure = $null
    if (Test-VisionGatewayOutage $Response) {
        $failure = [System.Exception]::new('Cannot reach the server behind the proxy (no server behind it answers): ' + $message)
        $failure.Data['VisionFailure'] = 'connect'
        $failure.Data['VisionNotUpYet'] = $true
    }
    else {
        $failure = [System.Exception]::new($message)
        $failure.Data['VisionStatus'] = [int]$Response.StatusCode
    }
    return $failure
}

function Get-VisionRetryDelay {
    # Seconds to wait before retry number $Attempt (0-based), on the schedule every client
    # shares (docs/clients/index.md#retries; vision_server/client/retry.py and the RETRY_*
    # constants of vision-client.sh say the same): the server's Retry-After when it gave one,
    # at most 120 s, plus up to a tenth more; else 0.5 s doubling each time up to 30 s, each
    # wait somewhere between half of that and all of it.
    param([int]$Attempt, $RetryAfter)
    $baseSec = 0.5
    $maxSec = 30.0
    $maxRetryAfterSec = 120.0
    # Seeded from a GUID: workers started in the same tick must not all pick the same delay.
    $random = [System.Random]::new([System.Guid]::NewGuid().GetHashCode())
    if ($null -ne $RetryAfter) {
        $wait = [Math]::Min([double]$RetryAfter, $maxRetryAfterSec)
        return $wait + $random.NextDouble() * (0.1 * $wait + 0.05)
    }
    $backoff = [Math]::Min($maxSec, $baseSec * [Math]::Pow(2, $Attempt))
    return $backoff / 2 + $random.NextDouble() * $backoff / 2
}

function Invoke-VisionApi {
    # GET or POST with retries on 429/502/503 and on connection failures (not on timeouts: the
    # server may still be working on the request). Returns the answer of the last attempt.
    param(
        $Client,
        [string]$Method,
        [string]$Uri,
        [string]$Body,
        [string]$ApiKey,
        [int]$TimeoutSec = 0,
        [int]$Retries = 0
    )
    $attempt = 0
    while ($true) {
        try {
            $response = Invoke-VisionHttp -Client $Client -Method $Method -Uri $Uri -Body $Body -ApiKey $ApiKey -TimeoutSec $TimeoutSec
        }
        catch {
            $failure = $_.Exception
            if ($failure.Data['VisionFailure'] -ne 'connect' -or $attempt -ge $Retries) { throw $failure }
            Start-Sleep -Milliseconds ([int](1000 * (Get-VisionRetryDelay -Attempt $attempt -RetryAfter $null)))
            $attempt++
            continue
        }
        $retryable = @(429, 502, 503) -contains $response.StatusCode
        if (-not $retryable -or $attempt -ge $Retries) { return $response }
        Start-Sleep -Milliseconds ([int](1000 * (Get-VisionRetryDelay -Attempt $attempt -RetryAfter $response.RetryAfter)))
        $attempt++
    }
}

function Get-VisionImageBase64 {
    # The image file as base64: the original bytes, untouched, unless -MaxSize asks for a
    # smaller copy and the image is larger than that.
    param([string]$Path, [int]$MaxSize = 0)
    # The name in a message with its control characters escaped (ConvertTo-VisionPrintable).
    if (-not [System.IO.File]::Exists($Path)) { throw ('Image file not found: {0}' -f (ConvertTo-VisionPrintable $Path)) }
    $bytes = [System.IO.File]::ReadAllBytes($Path)
    if ($bytes.Length -eq 0) { throw ('the file is empty (0 bytes): {0}' -f (ConvertTo-VisionPrintable $Path)) }
    if ($MaxSize -gt 0) {
        $smaller = Resize-VisionImage -Bytes $bytes -MaxSize $MaxSize
        if ($null -ne $smaller) { $bytes = $smaller }
    }
    return [System.Convert]::ToBase64String($bytes)
}

function Get-VisionRotateFlip {
    # The RotateFlipType that undoes an EXIF orientation (1..8), so pixels come out upright.
    param([int]$Orientation)
    switch ($Orientation) {
        2 { return [System.Drawing.RotateFlipType]::RotateNoneFlipX }
        3 { return [System.Drawing.RotateFlipType]::Rotate180FlipNone }
        4 { return [System.Drawing.RotateFlipType]::Rotate180FlipX }
        5 { return [System.Drawing.RotateFlipType]::Rotate90FlipX }
        6 { return [System.Drawing.RotateFlipType]::Rotate90FlipNone }
        7 { return [System.Drawing.RotateFlipType]::Rotate270FlipX }
        8 { return [System.Drawing.RotateFlipType]::Rotate270FlipNone }
    }
    return $null
}

function Resize-VisionImage {
    # Scales the image so its longer side is -MaxSize pixels, keeping the aspect ratio. Returns
    # the encoded bytes (JPEG for JPEG input, PNG otherwise), or $null when it is small enough.
    param([byte[]]$Bytes, [int]$MaxSize)
    if (-not (Test-VisionResizeSupported)) { throw (Get-VisionResizeUnsupportedMessage) }
    Add-Type -AssemblyName System.Drawing
    $source = $null
    $image = $null
    $canvas = $null
    $graphics = $null
    $attributes = $null
    $output = $null
    try {
        $source = [System.IO.MemoryStream]::new($Bytes)
        try {
            $image = [System.Drawing.Image]::FromStream($source)
        }
        catch {
            throw ('-MaxSize: System.Drawing cannot read this image ({0}); leave out -MaxSize to send it as it is.' -f (Get-VisionInnermostMessage $_.Exception))
        }
        $isJpeg = $image.RawFormat.Guid -eq [System.Drawing.Imaging.ImageFormat]::Jpeg.Guid
        if (@($image.PropertyIdList) -contains 0x0112) {
            $value = $image.GetPropertyItem(0x0112).Value
            if ($null -ne $value -and $value.Length -ge 2) {
                $flip = Get-VisionRotateFlip -Orientation ([System.BitConverter]::ToUInt16($value, 0))
                if ($null -ne $flip) { $image.RotateFlip($flip) }
            }
        }
        $width = $image.Width
        $height = $image.Height
        $longest = [Math]::Max($width, $height)
        if ($longest -le $MaxSize) { return $null }
        $scale = $MaxSize / [double]$longest
        $newWidth = [Math]::Max(1, [int][Math]::Round($width * $scale))
        $newHeight = [Math]::Max(1, [int][Math]::Round($height * $scale))
        $canvas = [System.Drawing.Bitmap]::new($newWidth, $newHeight)
        $graphics = [System.Drawing.Graphics]::FromImage($canvas)
        $graphics.InterpolationMode = [System.Drawing.Drawing2D.InterpolationMode]::HighQualityBicubic
        $graphics.PixelOffsetMode = [System.Drawing.Drawing2D.PixelOffsetMode]::HighQuality
        $graphics.CompositingQuality = [System.Drawing.Drawing2D.CompositingQuality]::HighQuality
        $graphics.SmoothingMode = [System.Drawing.Drawing2D.SmoothingMode]::HighQuality
        # TileFlipXY stops the bicubic filter from blending a dark fringe into the edges.
        $attributes = [System.Drawing.Imaging.ImageAttributes]::new()
        $attributes.SetWrapMode([System.Drawing.Drawing2D.WrapMode]::TileFlipXY)
        $target = [System.Drawing.Rectangle]::new(0, 0, $newWidth, $newHeight)
        $graphics.DrawImage($image, $target, 0, 0, $width, $height, [System.Drawing.GraphicsUnit]::Pixel, $attributes)
        $output = [System.IO.MemoryStream]::new()
        if ($isJpeg) {
            $jpegId = [System.Drawing.Imaging.ImageFormat]::Jpeg.Guid
            $codec = [System.Drawing.Imaging.ImageCodecInfo]::GetImageEncoders() | Where-Object { $_.FormatID -eq $jpegId } | Select-Object -First 1
            $parameters = [System.Drawing.Imaging.EncoderParameters]::new(1)
            $parameters.Param[0] = [System.Drawing.Imaging.EncoderParameter]::new([System.Drawing.Imaging.Encoder]::Quality, [long]92)
            $canvas.Save($output, $codec, $parameters)
            $parameters.Dispose()
        }
        else {
            $canvas.Save($output, [System.Drawing.Imaging.ImageFormat]::Png)
        }
        # The comma keeps PowerShell from unrolling the byte array into the pipeline.
        return , $output.ToArray()
    }
    finally {
        foreach ($item in @($output, $attributes, $graphics, $canvas, $image, $source)) {
            if ($null -ne $item) { $item.Dispose() }
        }
    }
}

function Get-VisionCaption {
    # Captions one image file and returns the caption text, trimmed. Throws with a readable
    # message on any failure (HTTP error, no answer, unreadable file).
    param(
        $Client,
        [string]$BaseUrl,
        [string]$Task,
        [string]$Path,
        [int]$MaxSize = 0,
        [string]$ApiKey,
        [int]$TimeoutSec = 0,
        [int]$Retries = 0,
        [string]$Model = ''
    )
    $image = Get-VisionImageBase64 -Path $Path -MaxSize $MaxSize
    $prompt = ConvertTo-Json -InputObject $Task -Compress
    # A model name picks one of the server's models; without one the server uses its default.
    $modelField = ''
    if (-not [string]::IsNullOrEmpty($Model)) { $modelField = ',"model":' + (ConvertTo-Json -InputObject $Model -Compress) }
    $body = '{"image":"' + $image + '","prompt":' + $prompt + $modelField + '}'
    $image = $null
    $response = Invoke-VisionApi -Client $Client -Method POST -Uri ($BaseUrl + '/process_image') -Body $body -ApiKey $ApiKey -TimeoutSec $TimeoutSec -Retries $Retries
    if ($response.StatusCode -ne 200) { throw (New-VisionAnswerError $response) }
    try {
        $parsed = ConvertFrom-Json -InputObject $response.Body -ErrorAction Stop
    }
    catch {
        throw ('The server answered 200 but not with JSON: {0}' -f $response.Body)
    }
    if ($null -eq $parsed -or $null -eq $parsed.result) {
        throw ('The server answered 200 without a "result": {0}' -f $response.Body)
    }
    return ([string]$parsed.result).Trim()
}

function Get-VisionPromptsPath {
    # /prompts, or /prompts?model=NAME for one of a several-model server's models.
    param([string]$Model = '')
    if ([string]::IsNullOrEmpty($Model)) { return '/prompts' }
    return '/prompts?model=' + [System.Uri]::EscapeDataString($Model)
}

function Get-VisionJson {
    # GET a JSON endpoint; returns the raw body text, or throws with the server's message.
    param($Client, [string]$BaseUrl, [string]$Path, [string]$ApiKey, [int]$TimeoutSec = 0, [int]$Retries = 0)
    $response = Invoke-VisionApi -Client $Client -Method GET -Uri ($BaseUrl + $Path) -ApiKey $ApiKey -TimeoutSec $TimeoutSec -Retries $Retries
    if ($response.StatusCode -ne 200) { throw (New-VisionAnswerError $response) }
    return $response.Body
}

function Read-VisionCaptionFile {
    # The caption text, or $null when the file does not exist, or is a pipe, socket or device
    # (never opened: a pipe waits for a writer forever; no caption, as captionfiles.read_caption
    # and has_caption say). A BOM, if any, is dropped.
    param([string]$Path)
    if (-not [System.IO.File]::Exists($Path)) { return $null }
    if (Test-VisionSpecialFile -Path $Path) { return $null }
    return [System.IO.File]::ReadAllText($Path, [System.Text.Encoding]::UTF8)
}

function Test-VisionSpecialFile {
    # Whether a pipe, socket or device is at $Path (followed through a link on PowerShell 7.4+,
    # whose items show UnixMode): never to be read as a caption, since opening a pipe waits for
    # a writer forever. Windows has no such files; older PowerShell cannot tell and says no.
    param([string]$Path)
    $item = Get-Item -LiteralPath $Path -Force -ErrorAction SilentlyContinue
    if ($null -eq $item -or $null -eq $item.PSObject.Properties['UnixMode']) { return $false }
    if ($item.PSObject.Properties['ResolvedTarget'] -and $item.LinkType) {
        $item = Get-Item -LiteralPath $item.ResolvedTarget -Force -ErrorAction SilentlyContinue
        if ($null -eq $item) { return $false }
    }
    return ([string]$item.UnixMode) -match '^[pscb]'
}

function Get-VisionNotACaptionReason {
    # Why no caption file may go where a pipe, socket or device stands ($Path), in the words of
    # captionfiles.NotACaptionFile: said when the run plans the image and when one appears later.
    param([string]$Path)
    return ('{0} is not a regular file (a pipe, socket or device), not a caption file' -f (ConvertTo-VisionPrintable ([System.IO.Path]::GetFileName($Path))))
}

function Get-VisionFolderNotACaptionReason {
    # Why no caption file may go where a folder stands ($Path), in the words of every folder
    # captioner (captionfiles.A_FOLDER_NOT_A_CAPTION), at planning and at the write alike.
    param([string]$Path)
    return ('{0} is a directory, not a caption file' -f (ConvertTo-VisionPrintable ([System.IO.Path]::GetFileName($Path))))
}

function Test-VisionCaptionPresent {
    # Only a caption with text counts; an empty file must not block a new attempt.
    param([string]$Path)
    $text = Read-VisionCaptionFile -Path $Path
    return ($null -ne $text -and $text.Trim().Length -gt 0)
}

function Test-VisionCaptionHeld {
    # Test-VisionCaptionPresent for a write about to happen: a file that cannot be read is left
    # alone rather than replaced, as the bash script leaves it.
    param([string]$Path)
    try { return (Test-VisionCaptionPresent -Path $Path) } catch { return $true }
}

function Join-VisionCaption {
    # What to store: the new caption alone, or added after/before the existing one.
    param([string]$New, [string]$Existing, [string]$Mode, [string]$Separator = ' ')
    $old = ''
    if ($null -ne $Existing) { $old = $Existing.Trim() }
    if ($old.Length -gt 0 -and $Mode -eq 'append') { return $old + $Separator + $New }
    if ($old.Length -gt 0 -and $Mode -eq 'prepend') { return $New + $Separator + $old }
    return $New
}

function Get-VisionNoSpaceReason($Exception) {
    # Why a write failed for want of space, in the words every folder captioner uses
    # (disk_full.no_space_reason): a full disk or an exhausted quota; $null for any other error.
    # On Windows the HResult carries ERROR_HANDLE_DISK_FULL (39) or ERROR_DISK_FULL (112); on
    # Linux and macOS .NET gives the errno itself: ENOSPC (28), EDQUOT (122 on Linux, 69 on macOS).
    # The write of the temporary file and the rename that puts it in place (a folder that must
    # grow for the caption's name) alike.
    for ($e = $Exception; $null -ne $e; $e = $e.InnerException) {
        if ($e -is [System.IO.IOException]) {
            $code = $e.HResult
            if (@(-2147024857, -2147024784) -contains $code) { return 'no space left on the device' }
            $unix = $PSVersionTable.PSVersion.Major -ge 6 -and -not $IsWindows
            if ($unix -and $code -eq 28) { return 'no space left on the device' }
            if ($unix -and (($IsMacOS -and $code -eq 69) -or (-not $IsMacOS -and $code -eq 122))) {
                return 'disk quota exceeded: no space left for this user'
            }
        }
    }
    return $null
}

function Test-VisionDiskFull($Exception) {
    # Whether a write failed for want of space (Get-VisionNoSpaceReason says why).
    return $null -ne (Get-VisionNoSpaceReason $Exception)
}

function Get-VisionCaptionEntry {
    # What stands at $Path, the link itself and not its target: 'none', 'link' (a symbolic link
    # or another reparse point) or 'file'. GetAttributes does not follow a link, on Windows and
    # on Linux and macOS alike, and tells a broken one too.
    param([string]$Path)
    try { $attributes = [System.IO.File]::GetAttributes($Path) }
    catch [System.IO.FileNotFoundException], [System.IO.DirectoryNotFoundException] { return 'none' }
    if (($attributes -band [System.IO.FileAttributes]::ReparsePoint) -ne 0) { return 'link' }
    return 'file'
}

function Get-VisionUnixFileMode {
    # The permission bits of the file $Path ([System.IO.UnixFileMode]) on Linux and macOS with
    # .NET 7 or newer (PowerShell 7.3+); $null elsewhere. On Windows File.Replace keeps the
    # replaced file's attributes and ACL itself.
    param([string]$Path)
    if ([System.IO.Path]::DirectorySeparatorChar -eq '\') { return $null }
    if ($null -eq [System.IO.File].GetMethod('GetUnixFileMode', [type[]]@([string]))) { return $null }
    return [System.IO.File]::GetUnixFileMode($Path)
}

function Assert-VisionCaptionWritable {
    # Throws, saying what to do, when the plain caption file $Path is one the user made
    # read-only, to be kept (the rule and the words of captionfiles.write_atomic): no write bit
    # at all ($UnixMode, from Get-VisionUnixFileMode; root may write any file, so only the bits
    # say it), or the ReadOnly attribute (Windows; on Linux and macOS .NET sets it when our
    # class of user lacks the write bit, which root may ignore where .NET says it is root).
    param([string]$Path, $UnixMode = $null)
    $readOnly = $null -ne $UnixMode -and ([int]$UnixMode -band 146) -eq 0   # 146: 0o222
    if (-not $readOnly -and ([System.IO.File]::GetAttributes($Path) -band [System.IO.FileAttributes]::ReadOnly) -ne 0) {
        $privileged = [System.Environment].GetProperty('IsPrivilegedProcess')   # .NET 8+
        $readOnly = $null -eq $UnixMode -or $null -eq $privileged -or -not [bool]$privileged.GetValue($null)
    }
    if ($readOnly) {
        throw ('{0} is read-only; make it writable (chmod u+w) to let it be replaced' -f (ConvertTo-VisionPrintable ([System.IO.Path]::GetFileName($Path))))
    }
}

function Move-VisionFileOverLink {
    # Puts $Temp in the place of the link $Path: the link itself is replaced by the plain file,
    # and the file it points to is never written (it may lie outside the dataset, or be shared
    # by several captions). rename(2) on Linux and macOS, MoveFileEx on Windows, both atomic.
    param([string]$Temp, [string]$Path)
    if ($null -ne [System.IO.File].GetMethod('Move', [type[]]@([string], [string], [bool]))) {
        [System.IO.File]::Move($Temp, $Path, $true)
        return
    }
    # Windows PowerShell 5.1 (.NET Framework) has no overwriting move: deleting a link deletes
    # the link alone, then the caption takes its name.
    [System.IO.File]::Delete($Path)
    [System.IO.File]::Move($Temp, $Path)
}

function Write-VisionTextFile {
    # Writes UTF-8 without BOM to a temporary file in the same folder, then moves it over the
    # target in one step. On any error the target is left as it was and the temp file removed.
    # The rules of every folder captioner (captionfiles.write_atomic): a caption file the user
    # made read-only is not replaced (it throws, saying so), a rewritten one keeps its mode, and
    # a symlinked one is replaced by a plain file with a new file's mode, its target untouched.
    # $Renamed (a synchronized hashtable, optional) gets $Path as a key once the caption is in
    # place, also when the worker is stopped right after the move (the folder script's Ctrl+C
    # summary counts it then).
    # With -KeepCaption (-Mode skip's write) it returns $true when written, $false when $Path
    # holds a caption by now (another run, a caption saved in the gallery): that one stays, also
    # one saved between the last look and the write, as File.Move without overwrite publishes
    # the new file only where none is. An empty file (no caption) is replaced, as before.
    param([string]$Path, [string]$Text, $Renamed = $null, [switch]$KeepCaption)
    if (Test-VisionSpecialFile -Path $Path) {
        # A pipe, socket or device made where the caption file belongs since the run planned the
        # image: not replaced, and the image fails in the planning's words, in every mode
        # (captionfiles.NotACaptionFile). Reading it to see whether it held a caption hung the worker.
        throw (Get-VisionNotACaptionReason -Path $Path)
    }
    if ((Get-VisionCaptionEntry -Path $Path) -eq 'file' -and [System.IO.Directory]::Exists($Path)) {
        # A folder made there since the run planned the image, likewise (File.Replace and the
        # copy after it failed in .NET's words). A link to a folder is replaced as any link.
        throw (Get-VisionFolderNotACaptionReason -Path $Path)
    }
    $unixMode = $null
    if ((Get-VisionCaptionEntry -Path $Path) -eq 'file') {
        if ($KeepCaption -and (Test-VisionCaptionHeld -Path $Path)) { return $false }
        $unixMode = Get-VisionUnixFileMode -Path $Path
        Assert-VisionCaptionWritable -Path $Path -UnixMode $unixMode
    }
    # The temp name has a fixed length, so a caption name near the 255-character limit fits too.
    $folder = [System.IO.Path]::GetDirectoryName($Path)
    $suffix = [System.Guid]::NewGuid().ToString('N').Substring(0, 16)
    $temp = [System.IO.Path]::Combine($folder, ('.vision-caption.{0}.tmp' -f $suffix))
    try {
        # Flushed to the disk before it is put in place, as the Python tools and the bash script
        # do, so a power cut cannot leave an empty file under the caption's name.
        $bytes = [System.Text.UTF8Encoding]::new($false).GetBytes($Text)
        $stream = [System.IO.FileStream]::new($temp, [System.IO.FileMode]::CreateNew, [System.IO.FileAccess]::Write)
        try {
            $stream.Write($bytes, 0, $bytes.Length)
            $stream.Flush($true)
        }
        finally {
            $stream.Dispose()
        }
        if ($null -ne $unixMode) { [System.IO.File]::SetUnixFileMode($temp, $unixMode) }
        if ($KeepCaption) {
            if (Test-VisionCaptionHeld -Path $Path) { return $false }
            if ((Get-VisionCaptionEntry -Path $Path) -eq 'none') {
                if ($null -ne $Renamed) { $Renamed[$Path] = $true }
                try {
                    [System.IO.File]::Move($temp, $Path)
                    return $true
                }
                catch [System.IO.IOException] {
                    # A file appeared meanwhile: kept when it holds a caption (the finally
                    # block removes the temp file and takes the key back).
                    if (Test-VisionCaptionHeld -Path $Path) { return $false }
                }
            }
        }
        # From here on the temp file is gone only once it was moved into place: the finally
        # block below takes the key back while the temp file is still there.
        if ($null -ne $Renamed) { $Renamed[$Path] = $true }
        $entry = Get-VisionCaptionEntry -Path $Path
        if ($entry -eq 'link') {
            Move-VisionFileOverLink -Temp $temp -Path $Path
        }
        elseif ($entry -eq 'file') {
            try {
                [System.IO.File]::Replace($temp, $Path, [NullString]::Value)
            }
            catch {
                # ReplaceFile can refuse (some network shares, antivirus locks). Copying over
                # the target is not atomic, but it is only the fallback for that case; not for
                # a full disk, where the copy would cut the caption file short.
                if (Test-VisionDiskFull $_.Exception) { throw }
                [System.IO.File]::Copy($temp, $Path, $true)
            }
        }
        else {
            [System.IO.File]::Move($temp, $Path)
        }
        if ($KeepCaption) { return $true }
    }
    finally {
        if ([System.IO.File]::Exists($temp)) {
            if ($null -ne $Renamed) { $Renamed.Remove($Path) }
            try { [System.IO.File]::Delete($temp) } catch { }
        }
    }
}

function Invoke-VisionCaptionImage {
    # The whole job for one image in the folder script: caption it and write the caption file.
    # Never throws; returns Image, CaptionPath, Ok, Skipped, Error, Failure ('connect', 'timeout',
    # 'scheme' or $null), Status (the HTTP status of an error answer, else $null) and Seconds.
    # Skipped (with Ok, and the reason in Error): in -Mode skip, the caption file was written
    # since the run listed the folder (another run, a caption saved in the gallery) and stays.
    param(
        $Client,
        [string]$BaseUrl,
        [string]$Task,
        [string]$ImagePath,
        [string]$CaptionPath,
        [string]$Mode = 'skip',
        [string]$Prefix = '',
        [string]$Suffix = '',
        [string]$Separator = ' ',
        [int]$MaxSize = 0,
        [string]$ApiKey,
        [int]$TimeoutSec = 0,
        [int]$Retries = 0,
        [string]$Model = '',
        $Renamed = $null
    )
    $ErrorActionPreference = 'Stop'
    $watch = [System.Diagnostics.Stopwatch]::StartNew()
    $ok = $false
    $message = $null
    $failure = $null
    $status = $null
    $skipped = $false
    $meanwhile = 'its caption file was written meanwhile (by another run, or saved in the gallery); left as it is'
    try {
        # In the words every folder captioner uses; the summary names the image before it.
        if ([System.IO.File]::Exists($ImagePath) -and ([System.IO.FileInfo]::new($ImagePath)).Length -eq 0) {
            throw 'the file is empty (0 bytes)'
        }
        # The run was planned when it listed the folder, maybe hours ago: a caption file written
        # since stays, and the image is not sent (the words of vision-client folder).
        $present = $false
        if ($Mode -eq 'skip') {
            try { $present = Test-VisionCaptionPresent -Path $CaptionPath } catch { }
        }
        if ($present) { throw $meanwhile }
        $caption = Get-VisionCaption -Client $Client -BaseUrl $BaseUrl -Task $Task -Path $ImagePath -MaxSize $MaxSize -ApiKey $ApiKey -TimeoutSec $TimeoutSec -Retries $Retries -Model $Model
        # A prefix alone is no caption, and an empty caption file reads as "to do" on the next run:
        # the image fails, as in the other folder captioners.
        if ([string]::IsNullOrWhiteSpace($caption)) { throw 'the server returned an empty caption' }
        $existing = $null
        if ($Mode -eq 'append' -or $Mode -eq 'prepend') { $existing = Read-VisionCaptionFile -Path $CaptionPath }
        # Keep each caption on one line, as the other clients write it.
        $caption = ($caption -replace "`r`n|`r|`n", ' ')
        $text = Join-VisionCaption -New ($Prefix + $caption + $Suffix) -Existing $existing -Mode $Mode -Separator $Separator
        if ($Mode -eq 'skip') {
            # One saved while the server captioned the image stays too.
            if (-not (Write-VisionTextFile -Path $CaptionPath -Text $text -Renamed $Renamed -KeepCaption)) {
                throw $meanwhile
            }
        }
        else {
            Write-VisionTextFile -Path $CaptionPath -Text $text -Renamed $Renamed
        }
        $ok = $true
    }
    catch {
        if ($_.Exception.Message -eq $meanwhile) {
            $skipped = $true
            $ok = $true
        }
        $message = $_.Exception.Message
        $failure = $_.Exception.Data['VisionFailure']
        $status = $_.Exception.Data['VisionStatus']
        $noSpace = Get-VisionNoSpaceReason $_.Exception
        if ($null -ne $noSpace) {
            # Every image after this one would fail the same way, whether the write or the move
            # into place met it: the folder script stops the run (the words of vision-client
            # folder and vision-server caption, the path on one line).
            $failure = 'diskfull'
            $message = 'cannot write {0}: {1}' -f (ConvertTo-VisionPrintable $CaptionPath), $noSpace
        }
    }
    return [pscustomobject]@{
        Image       = $ImagePath
        CaptionPath = $CaptionPath
        Ok          = $ok
        Skipped     = $skipped
        Error       = $message
        Failure     = $failure
        Status      = $status
        Seconds     = $watch.Elapsed.TotalSeconds
    }
}
