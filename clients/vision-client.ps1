<#
.SYNOPSIS
Captions one image with a vision-server, or asks the server for its prompts, model or status.

.DESCRIPTION
vision-client.ps1 <PROMPT> <ImagePath> sends the image file to the server's native API
(POST /process_image) and prints the caption, and nothing else, on standard output, so it can
be redirected into a file or captured in a variable.

The file is sent exactly as it is on disk (base64 encoded): no resizing and no re-encoding,
unless -MaxSize asks for it. The server accepts JPEG, PNG, GIF, BMP, TIFF and WebP.

Instead of a prompt, the first argument can be a command:
  prompts   list the prompts the server's model understands, one per line
  model     print the id of the model the server serves
  status    print the server's status (GET /v1/status) as JSON

Errors go to standard error, with the server's own explanation when it sent one, and the
script exits with code 1: HTTP errors, a server that cannot be reached, a timeout, a missing
or empty file. Missing arguments exit with code 2. Busy answers (429/502/503) and refused
connections are retried a few times first (see -Retries).

Works on Windows PowerShell 5.1 and PowerShell 7 on any system.

.PARAMETER Prompt
The task, with or without angle brackets and in any case: CAPTION, DETAILED_CAPTION,
MORE_DETAILED_CAPTION, GENERATE_TAGS, ANALYZE, MIXED_CAPTION, MIXED_CAPTION_PLUS.
Or one of the commands prompts, model, status.

.PARAMETER ImagePath
The image file to caption. Relative paths are relative to the current location.

.PARAMETER Url
The server, as a full URL such as http://127.0.0.1:54880 (host:port also works). Defaults to
$env:VISION_HOST, then http://127.0.0.1:54880.

.PARAMETER MaxSize
Shrink the image first so that its longer side is at most this many pixels, keeping the aspect
ratio (JPEG stays JPEG, anything else is sent as PNG). Smaller images are sent untouched.
Needs System.Drawing, which exists only on Windows. Rarely needed: the server resizes to the
model's input size itself; use it to send less data over a slow network.

.PARAMETER TimeoutSec
How long to wait for the answer, in seconds (default 300; 0 waits for ever). The first request
after the server has been idle also waits for the model to load.

.PARAMETER ApiKey
Sent as 'Authorization: Bearer <key>' when the server was started with --api-key.
Defaults to $env:VISION_API_KEY.

.PARAMETER Retries
How many times to retry when the server is busy (429/502/503, waiting as long as its
Retry-After asks, at most 120 s, or else 0.5, 1, 2, 4... s, at most 30 s, each with a little
jitter) or refuses the connection. Default 5, as every client; 0 turns retries off.

.PARAMETER Model
Which of the server's models captions, by the name it was started with
(--model NAME=SOURCE); with 'prompts', whose prompts to list. Defaults to $env:VISION_MODEL,
then the server's default model. A server with one model accepts any name.

.EXAMPLE
.\vision-client.ps1 CAPTION cat.jpg

Prints a one-line caption of cat.jpg.

.EXAMPLE
$env:VISION_HOST = 'http://gpu-box:54880'; .\vision-client.ps1 '<DETAILED_CAPTION>' .\photos\dog.png > dog.txt

Uses another server and saves the caption.

.EXAMPLE
.\vision-client.ps1 prompts

Lists the prompts the server accepts.

.NOTES
The caption is printed with the console's output encoding. To store captions with accents or
other non-ASCII text safely, use vision-caption-folder-images.ps1, which writes UTF-8 files
itself.
#>
[CmdletBinding()]
param(
    [Parameter(Position = 0)]
    [string]$Prompt,

    [Parameter(Position = 1)]
    [string]$ImagePath,

    [string]$Url,

    [ValidateRange(0, 100000)]
    [int]$MaxSize = 0,

    [ValidateRange(0, 86400)]
    [int]$TimeoutSec = 300,

    [string]$ApiKey = $env:VISION_API_KEY,

    [ValidateRange(0, 100)]
    [int]$Retries = 5,

    [string]$Model = $env:VISION_MODEL
)

$ErrorActionPreference = 'Stop'
# A Set-StrictMode in the caller's profile would apply to this script too (strict mode is
# inherited by child scopes): $IsLinux, unset in Windows PowerShell 5.1, and a missing JSON
# property would then stop it. The script is written for the default rules.
Set-StrictMode -Off
. (Join-Path $PSScriptRoot 'VisionClient.Common.ps1')

$scriptName = Split-Path -Leaf $PSCommandPath

function Write-ClientError([string]$Message) {
    [Console]::Error.WriteLine(('{0}: {1}' -f $scriptName, $Message))
}

if ([string]::IsNullOrWhiteSpace($Prompt)) {
    Write-ClientError 'missing arguments'
    [Console]::Error.WriteLine(('Usage: {0} <PROMPT> <ImagePath> [-Url URL] [-Model NAME] [-MaxSize N] [-TimeoutSec N]' -f $scriptName))
    [Console]::Error.WriteLine(('       {0} prompts | model | status' -f $scriptName))
    [Console]::Error.WriteLine(('Example: {0} CAPTION cat.jpg    (details: Get-Help {0} -Full)' -f $scriptName))
    exit 2
}

$command = $Prompt.Trim().ToLowerInvariant()
$isCommand = @('prompts', 'model', 'status') -contains $command
if (-not $isCommand -and [string]::IsNullOrWhiteSpace($ImagePath)) {
    Write-ClientError ('missing the image path: {0} {1} <ImagePath>' -f $scriptName, $Prompt)
    exit 2
}
if (-not $isCommand -and $MaxSize -gt 0 -and -not (Test-VisionResizeSupported)) {
    Write-ClientError (Get-VisionResizeUnsupportedMessage)
    exit 2
}

$client = $null
try {
    $baseUrl = Resolve-VisionBaseUrl -Url $Url
    $client = New-VisionHttpClient -TimeoutSec $TimeoutSec -MaxConnections 1
    $common = @{ Client = $client; BaseUrl = $baseUrl; ApiKey = $ApiKey; TimeoutSec = $TimeoutSec; Retries = $Retries }

    if ($command -eq 'prompts') {
        $prompts = ConvertFrom-Json -InputObject (Get-VisionJson @common -Path (Get-VisionPromptsPath -Model $Model))
        foreach ($item in $prompts) {
            $name = ([string]$item).Trim('<', '>')
            Write-Output $name
        }
    }
    elseif ($command -eq 'model') {
        # /model answers a bare JSON string, e.g. "MiaoshouAI/Florence-2-base-PromptGen-v2.0".
        $body = Get-VisionJson @common -Path '/model'
        try { $model = [string](ConvertFrom-Json -InputObject $body -ErrorAction Stop) }
        catch { $model = $body.Trim().Trim('"') }
        Write-Output $model
    }
    elseif ($command -eq 'status') {
        Write-Output (Get-VisionJson @common -Path '/v1/status')
    }
    else {
        $task = ConvertTo-VisionTask -Prompt $Prompt
        $path = $ExecutionContext.SessionState.Path.GetUnresolvedProviderPathFromPSPath($ImagePath)
        if ([System.IO.Directory]::Exists($path)) {
            throw ('{0} is a folder; to caption a whole folder use vision-caption-folder-images.ps1' -f (ConvertTo-VisionPrintable $path))
        }
        $caption = Get-VisionCaption @common -Task $task -Path $path -MaxSize $MaxSize -Model $Model
        Write-Output $caption
    }
    $exitCode = 0
}
catch {
    Write-ClientError $_.Exception.Message
    $exitCode = 1
}
finally {
    if ($null -ne $client) { $client.Dispose() }
}
exit $exitCode
