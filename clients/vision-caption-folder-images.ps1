<#
.SYNOPSIS
Captions every image in a folder with a vision-server and writes each caption beside its image.

.DESCRIPTION
vision-caption-folder-images.ps1 <PROMPT> <CaptionExt> <Folder> finds the images in Folder
and its subfolders (jpg, jpeg, png, gif, bmp, tif, tiff, webp, in any case), sends each file
as it is to the server (POST /process_image) and writes the caption to a file with the same
name and the extension CaptionExt: cat.png -> cat.txt.

- Images that already have a caption with text are skipped (-Mode skip, the default), so an
  interrupted run can simply be started again. An empty caption file does not count.
- Caption files are UTF-8 without BOM, on one line (line breaks in a caption become spaces),
  with no trailing newline. Each is written to a
  temporary file in the same folder first and moved over the target only when complete, so
  a failure or Ctrl+C never leaves a half-written or error-filled caption behind. Such
  temporary files (.vision-caption.<16 hex digits>.tmp) that a killed run left, older than
  15 minutes, are deleted at the start in the folders this run captions; it says how many.
- A failed image is reported and the run goes on. The failures are listed at the end and the
  script exits with code 1 if there was any. The run stops early only on what every other
  image would meet too: a server that cannot be reached for longer than -WaitForServerSec, at
  the start or during the run (a restart only pauses it), that stays busy after -Retries,
  that refuses the API key or the prompt, or that answers HTTP 404 (no such -Model, also once
  a restarted server no longer serves it). The summary then says why, and how many images were
  not attempted ("Stopped early, N image(s) not attempted: ..."); the exit code says the cause.
  A full disk (no space left for a caption file, or a quota) stops the run too, with exit
  code 1: free some space and run the same command again to resume.
  This holds at the first request (GET /prompts, at most 30 s or -TimeoutSec, no retries) too;
  a busy, slow or failing (HTTP 500) answer to it is only a warning ("trying anyway"), as in
  vision-caption-folder-images.sh. A prompt the server does not know is refused at the first
  image (exit code 7).
- -Jobs N (default 4) keeps N requests in flight, which lets the server batch them on the GPU.
  It works the same on Windows PowerShell 5.1 and PowerShell 7 (a runspace pool).
- Images with the same name but another extension (a.jpg and a.png) would share one caption
  file (a.txt) that a trainer pairs with both: none of them is captioned and each is reported
  as failed, also when a.txt already exists (it is left as it is); rename all but one. So do
  b.jpg and B.png in a folder whose file system folds case (NTFS, macOS, exFAT, a Samba share),
  where b.txt and B.txt are one file; the script asks the file system, not the platform.
- Progress shows the count, images per second and the time left.
- Ctrl+C stops the requests in flight and prints what was done (every caption this run put in
  place, the failures) and how many images are not captioned yet; run the same command again
  to resume.

Exit codes (the same as vision-caption-folder-images.sh and vision-client folder): 0 all
images captioned or skipped; 1 some image failed; 2 wrong arguments (also a -Url without a
vision-server, or a -Model it does not serve: HTTP 404, at the start or during the run, which
stops it early too); the run stopped early:
3 the server cannot be reached (also a host name that does not resolve, TLS trouble), 5 the
server stays busy after -Retries, 6 the API key is refused, 7 the server refuses the prompt;
130 Ctrl+C. Earlier versions exited 1 for these stops (2 for an unknown prompt), and 0 after
Ctrl+C.

.PARAMETER Prompt
The task, with or without angle brackets and in any case: CAPTION, DETAILED_CAPTION,
MORE_DETAILED_CAPTION, GENERATE_TAGS, ANALYZE, MIXED_CAPTION, MIXED_CAPTION_PLUS.

.PARAMETER CaptionExt
Extension of the caption files, with or without the dot: txt, caption, .txt. An image
extension is refused, since the captions would replace the images.

.PARAMETER Folder
The folder to caption. Subfolders are included unless -NoRecurse is given. Hidden files and
folders below it (a name starting with '.', such as .ipynb_checkpoints) are left out; give a
hidden folder as Folder to caption it.

.PARAMETER Mode
What to do when an image already has a caption file:
skip (default) leave it alone if it has text (also one saved while the run goes);
overwrite replace it; append add the new caption after the existing text; prepend add it
before. append and prepend add text on every
run, so run them once.

.PARAMETER Prefix
Text put before every new caption, for example a trigger word: -Prefix 'ohwx, '.
Include your own separator.

.PARAMETER Suffix
Text put after every new caption: -Suffix ', film photo'.

.PARAMETER Separator
What joins the old and the new caption in append and prepend mode (default one space).
Use ', ' for tag lists.

.PARAMETER Jobs
How many requests to keep in flight at once (1 to 64, default 4), so the server can batch
them on the GPU. Use 1 to caption strictly one image after the other.

.PARAMETER NoRecurse
Only caption the images directly in Folder, not those in subfolders.

.PARAMETER Quiet
Do not print a line per captioned image. Failures, progress and the summary still show.

.PARAMETER MaxSize
Shrink each image first so that its longer side is at most this many pixels (see
vision-client.ps1 -MaxSize). Needs System.Drawing, which exists only on Windows.

.PARAMETER Url
The server, as a full URL such as http://127.0.0.1:54880. Defaults to $env:VISION_HOST, then
http://127.0.0.1:54880.

.PARAMETER TimeoutSec
How long to wait for each caption, in seconds (default 300; 0 waits for ever).

.PARAMETER ApiKey
Sent as 'Authorization: Bearer <key>'. Defaults to $env:VISION_API_KEY.

.PARAMETER Retries
How many times to send one image again when the server is busy (429/502/503, after its
Retry-After, at most 120 s, or 0.5, 1, 2, 4... s, at most 30 s, each with a little jitter) or
refuses the connection (default 5; the schedule and default of every client).

.PARAMETER WaitForServerSec
When the server goes away during the run (a restart, a deploy), pause and wait up to this
many seconds for it to answer again, then send the images that were in flight again
(default 300). Behind a proxy such as HAProxy a restart shows as the proxy's own 502/503
(without Retry-After): after -Retries those pause the run the same way, until /prompts
answers other than 502/503/504. After that the run stops early and says how many images were not attempted;
run it again to resume. An image whose request keeps breaking the connection (six times: a
server that crashes on it) fails alone. A server that is not up yet at the start (connection
refused, or such a proxy answer) is waited for the same way; a host name that does not
resolve (exit code 3), a refused API key (6) or an address without a vision-server (HTTP 404,
exit code 2) stop the run at once. 0 stops the run after -Retries instead (exit code 3).

.PARAMETER Model
Which of the server's models captions the folder, by the name it was started with
(--model NAME=SOURCE). Defaults to $env:VISION_MODEL, then the server's default model.

.EXAMPLE
.\vision-caption-folder-images.ps1 DETAILED_CAPTION txt C:\datasets\cats

Writes C:\datasets\cats\**\*.txt for every image that has no caption yet.

.EXAMPLE
.\vision-caption-folder-images.ps1 GENERATE_TAGS txt .\train -Mode overwrite -Prefix 'ohwx, ' -Jobs 8

Replaces every caption with a fresh tag list that starts with a trigger word, 8 at a time.

.EXAMPLE
.\vision-caption-folder-images.ps1 CAPTION caption D:\photos -NoRecurse -Url http://gpu-box:54880
#>
[CmdletBinding()]
param(
    [Parameter(Position = 0)]
    [string]$Prompt,

    [Parameter(Position = 1)]
    [string]$CaptionExt,

    [Parameter(Position = 2)]
    [string]$Folder,

    [ValidateSet('skip', 'overwrite', 'append', 'prepend')]
    [string]$Mode = 'skip',

    [string]$Prefix = '',

    [string]$Suffix = '',

    [string]$Separator = ' ',

    [ValidateRange(1, 64)]
    [int]$Jobs = 4,

    [switch]$NoRecurse,

    [switch]$Quiet,

    [ValidateRange(0, 100000)]
    [int]$MaxSize = 0,

    [string]$Url,

    [ValidateRange(0, 86400)]
    [int]$TimeoutSec = 300,

    [string]$ApiKey = $env:VISION_API_KEY,

    [ValidateRange(0, 100)]
    [int]$Retries = 5,

    [ValidateRange(0, 86400)]
    [int]$WaitForServerSec = 300,

    [string]$Model = $env:VISION_MODEL
)

$ErrorActionPreference = 'Stop'
# A Set-StrictMode in the caller's profile would apply to this script too (strict mode is
# inherited by child scopes): $IsLinux, unset in Windows PowerShell 5.1, and a missing JSON
# property would then stop it. The script is written for the default rules.
Set-StrictMode -Off
. (Join-Path $PSScriptRoot 'VisionClient.Common.ps1')

$scriptName = Split-Path -Leaf $PSCommandPath
$Mode = $Mode.ToLowerInvariant()

function Write-FolderError([string]$Message) {
    [Console]::Error.WriteLine($Message)
}

function Exit-WithUsage([string]$Message) {
    Write-FolderError ('{0}: {1}' -f $scriptName, $Message)
    Write-FolderError ('Usage: {0} <PROMPT> <CaptionExt> <Folder> [-Mode skip|overwrite|append|prepend] [-Prefix TEXT] [-Suffix TEXT] [-Jobs N] [-NoRecurse] [-MaxSize N] [-Url URL]' -f $scriptName)
    Write-FolderError ('Example: {0} DETAILED_CAPTION txt C:\path\to\folder    (details: Get-Help {0} -Full)' -f $scriptName)
    exit 2
}

function Get-CaptionSuffix([string]$Extension) {
    # 'txt' or '.txt' -> '.txt'; $null when it is unusable.
    $clean = $Extension.Trim().TrimStart('.')
    if ($clean.Length -eq 0 -or $clean.IndexOfAny([System.IO.Path]::GetInvalidFileNameChars()) -ge 0 -or
        $clean.Contains('/') -or $clean.Contains('\')) {
        return $null
    }
    return '.' + $clean
}

function Format-Duration([double]$Seconds) {
    if ($Seconds -lt 0 -or [double]::IsInfinity($Seconds) -or [double]::IsNaN($Seconds)) { return '?' }
    return [System.TimeSpan]::FromSeconds([Math]::Round($Seconds)).ToString()
}

function Test-HiddenBelow([string]$RootFull, [string]$Path) {
    # Whether a name in $Path below $RootFull starts with '.': such a file or folder is no part
    # of the dataset (.ipynb_checkpoints, .cache, macOS '._name' files), as in the bash script
    # and the Python tools. $RootFull itself may be hidden; a path not under it is not judged.
    if (-not $Path.StartsWith($RootFull, [System.StringComparison]::OrdinalIgnoreCase)) { return $false }
    foreach ($name in $Path.Substring($RootFull.Length).Split([char[]]@('\', '/'))) {
        if ($name.StartsWith('.')) { return $true }
    }
    return $false
}

function Get-ImageFile([string]$Root, [bool]$Recurse) {
    # Full paths of the images under $Root, sorted; hidden names below $Root are left out.
    $extensions = Get-VisionImageExtension
    $rootFull = (New-Object System.IO.DirectoryInfo $Root).FullName.TrimEnd([char[]]@('\', '/'))
    $walkErrors = $null
    $files = Get-ChildItem -LiteralPath $Root -File -Recurse:$Recurse -ErrorAction SilentlyContinue -ErrorVariable walkErrors
    foreach ($problem in @($walkErrors)) {
        if ($null -ne $problem) { Write-FolderError ('warning: {0}' -f $problem.Exception.Message) }
    }
    $images = foreach ($file in $files) {
        $extension = $file.Extension.TrimStart('.').ToLowerInvariant()
        if ($extensions -contains $extension -and -not (Test-HiddenBelow $rootFull $file.FullName)) { $file.FullName }
    }
    return @($images | Sort-Object)
}

function Remove-FolderStaleTemp([string]$Root, [bool]$Recurse) {
    # Deletes the temporary captions a killed run left (the name every vision-server client
    # uses), when older than 15 minutes: a younger one may be another run's write in progress.
    # Regular files only; returns how many went. Hidden folders below $Root (.git, .cache) are
    # no part of the dataset and are not entered (a big .git is slow to walk), nor are linked
    # ones, as the bash script and the Python tools walk; the temp files themselves are dot-named.
    $limit = [System.DateTime]::UtcNow.AddMinutes(-15)
    $removed = 0
    $found = New-Object System.Collections.Generic.List[System.IO.FileInfo]
    $folders = New-Object System.Collections.Generic.Stack[System.IO.DirectoryInfo]
    $folders.Push((New-Object System.IO.DirectoryInfo $Root))
    while ($folders.Count -gt 0) {
        $folder = $folders.Pop()
        try { $entries = $folder.GetFileSystemInfos() } catch { continue }
        foreach ($entry in $entries) {
            if ($entry -is [System.IO.FileInfo]) {
                if ($entry.Name -like '.vision-caption.*.tmp') { $found.Add($entry) }
                continue
            }
            $link = ($entry.Attributes -band [System.IO.FileAttributes]::ReparsePoint) -ne 0
            if ($Recurse -and -not $link -and -not $entry.Name.StartsWith('.')) { $folders.Push($entry) }
        }
    }
    foreach ($file in $found) {
        $ours = $file.Name -cmatch '^\.vision-caption\.[0-9a-f]{16}\.tmp$'
        $link = ($file.Attributes -band [System.IO.FileAttributes]::ReparsePoint) -ne 0
        if (-not $ours -or $link -or $file.LastWriteTimeUtc -ge $limit) { continue }
        try {
            [System.IO.File]::Delete($file.FullName)
            $removed++
        }
        catch {
            Write-FolderError ('warning: cannot delete {0}: {1}' -f (ConvertTo-VisionPrintable $file.FullName), $_.Exception.Message)
        }
    }
    return $removed
}

function Test-FolderServerAnswer {
    # Any HTTP answer to GET /prompts within 10 s but 502/503/504 (a proxy with no server behind
    # it yet) means the server is back. A client of its own, so no pooled connection of the dead
    # server is tried.
    $probe = New-VisionHttpClient -TimeoutSec 10 -MaxConnections 1
    try {
        $answer = Invoke-VisionHttp -Client $probe -Method GET -Uri ($baseUrl + '/prompts') -ApiKey $ApiKey -TimeoutSec 10
        return (@(502, 503, 504) -notcontains $answer.StatusCode)
    }
    catch {
        return $false
    }
    finally {
        $probe.Dispose()
    }
}

function Get-FolderStop([string]$Failure, $Status, [string]$Message) {
    # Whether a failed request stops the run, as in vision-caption-folder-images.sh and
    # vision-client folder: every other image would meet the same. Returns Code (the exit code)
    # and Reason, or $null to go on (the image alone failed). The message keeps its closing full
    # stop inside the brackets, as in the other two; only the 404 drops it before ': check -Url'.
    if (@('connect', 'scheme') -contains $Failure) {
        return [pscustomobject]@{ Code = 3; Reason = ('the server cannot be reached ({0})' -f $Message) }
    }
    if ($Failure -eq 'diskfull') {   # no space left for a caption file: exit code 1, as failed images
        return [pscustomobject]@{ Code = 1; Reason = ('{0}; free some space, then run the same command again: it resumes where this run stopped' -f $Message) }
    }
    if ($null -eq $Status) { return $null }
    $code = [int]$Status
    if (@(401, 403) -contains $code) {
        return [pscustomobject]@{ Code = 6; Reason = ('the server refused the API key ({0})' -f $Message) }
    }
    if (@(429, 502, 503) -contains $code) {
        return [pscustomobject]@{ Code = 5; Reason = ('the server stays busy or unavailable ({0})' -f $Message) }
    }
    if ($code -eq 400 -and $Message -like 'HTTP 400: Invalid prompt*') {
        return [pscustomobject]@{ Code = 7; Reason = ('the server refused the prompt ({0})' -f $Message) }
    }
    if ($code -eq 404) {
        # The server (restarted?) no longer serves -Model, or is no vision-server any more: as
        # a 404 at the start, an option to fix (exit code 2).
        # -Model is named only when one was given: without it only -Url can be wrong.
        return [pscustomobject]@{ Code = 2; Reason = ('{0}: check -Url (the server''s base address){1}' -f $Message.TrimEnd('.'), $(if ($Model) { ' and -Model' } else { '' })) }
    }
    return $null
}

function Wait-FolderServer([string]$LastError) {
    # After an outage: probe until the server answers again or -WaitForServerSec runs out.
    # Returns $null when it is back, else why the run stops.
    if (Test-FolderServerAnswer) { return $null }   # a blip: go on quietly
    Write-FolderError ('{0}: server unreachable; waiting up to {1} s for it to come back' -f $scriptName, $WaitForServerSec)
    $waited = [System.Diagnostics.Stopwatch]::StartNew()
    $pause = 1.0
    while ($waited.Elapsed.TotalSeconds -lt $WaitForServerSec) {
        $left = $WaitForServerSec - $waited.Elapsed.TotalSeconds
        Start-Sleep -Milliseconds ([int](1000 * [Math]::Min($pause, $left)))
        $pause = [Math]::Min(5.0, 2 * $pause)
        if (Test-FolderServerAnswer) {
            Write-FolderError ('{0}: server back; going on' -f $scriptName)
            return $null
        }
    }
    return ('the server cannot be reached (still not after waiting {0} s: {1})' -f $WaitForServerSec, $LastError)
}

# --- arguments --------------------------------------------------------------------------------

if ([string]::IsNullOrWhiteSpace($Prompt) -or [string]::IsNullOrWhiteSpace($CaptionExt) -or [string]::IsNullOrWhiteSpace($Folder)) {
    Exit-WithUsage 'missing arguments'
}
try { $task = ConvertTo-VisionTask -Prompt $Prompt } catch { Exit-WithUsage $_.Exception.Message }
$captionSuffix = Get-CaptionSuffix $CaptionExt
if ($null -eq $captionSuffix) { Exit-WithUsage ('invalid caption extension: {0}' -f $CaptionExt) }
if ((Get-VisionImageExtension) -contains $captionSuffix.TrimStart('.').ToLowerInvariant()) {
    Exit-WithUsage ('caption extension {0} is an image extension; the captions would replace the images' -f $CaptionExt)
}
$root = $ExecutionContext.SessionState.Path.GetUnresolvedProviderPathFromPSPath($Folder)
if (-not [System.IO.Directory]::Exists($root)) { Exit-WithUsage ('folder not found: {0}' -f (ConvertTo-VisionPrintable $root)) }
if ($MaxSize -gt 0 -and -not (Test-VisionResizeSupported)) { Exit-WithUsage (Get-VisionResizeUnsupportedMessage) }
try { $baseUrl = Resolve-VisionBaseUrl -Url $Url } catch { Exit-WithUsage $_.Exception.Message }

# --- plan: which images need a request --------------------------------------------------------

$swept = Remove-FolderStaleTemp -Root $root -Recurse (-not $NoRecurse)
if ($swept -gt 0) { Write-Host ('Removed {0} leftover temporary caption file(s) of a killed run' -f $swept) }

$images = @(Get-ImageFile -Root $root -Recurse (-not $NoRecurse))
if ($images.Count -eq 0) {
    Write-Host ('No images found in {0}' -f (ConvertTo-VisionPrintable $root))
    exit 0
}

$work = New-Object System.Collections.Generic.List[object]
$clashes = New-Object System.Collections.Generic.List[object]
# Whether the file system of $Image's folder folds case (NTFS, macOS as formatted by default,
# exFAT, a Samba share: b.txt and B.txt are one file there): the image's name with its case
# swapped finds a file though no entry of the folder has that name. Asked of the file system, not
# guessed from the platform (a macOS volume or an NTFS folder can be case-sensitive), as
# vision-client folder and vision-server caption ask it.
function Test-FoldsCase([string]$Image) {
    $folder = [System.IO.Path]::GetDirectoryName($Image)
    $chars = [System.IO.Path]::GetFileName($Image).ToCharArray() | ForEach-Object {
        if ([char]::IsUpper($_)) { [char]::ToLowerInvariant($_) } else { [char]::ToUpperInvariant($_) }
    }
    $swapped = -join $chars
    if (-not [System.IO.File]::Exists([System.IO.Path]::Combine($folder, $swapped))) { return $false }
    foreach ($entry in [System.IO.Directory]::EnumerateFileSystemEntries($folder)) {
        if ([System.IO.Path]::GetFileName($entry) -ceq $swapped) { return $false }   # two files
    }
    return $true
}
# Stems that differ in case alone (b.jpg, B.png): their folder is asked, once.
$spelled = New-Object 'System.Collections.Generic.Dictionary[string,string]'
$foldsCase = New-Object 'System.Collections.Generic.Dictionary[string,bool]'
foreach ($image in $images) {
    $captionPath = [System.IO.Path]::ChangeExtension($image, $captionSuffix)
    $lower = $captionPath.ToLowerInvariant()
    if (-not $spelled.ContainsKey($lower)) { $spelled[$lower] = $captionPath }
    elseif ($spelled[$lower] -cne $captionPath) {
        $imageFolder = [System.IO.Path]::GetDirectoryName($image)
        if (-not $foldsCase.ContainsKey($imageFolder)) { $foldsCase[$imageFolder] = Test-FoldsCase $image }
    }
}
# A caption path as its folder's file system compares names: lower-cased where it folds case.
function Get-ClaimKey([string]$CaptionPath) {
    $captionFolder = [System.IO.Path]::GetDirectoryName($CaptionPath)
    if ($foldsCase.ContainsKey($captionFolder) -and $foldsCase[$captionFolder]) {
        return [System.IO.Path]::Combine($captionFolder, [System.IO.Path]::GetFileName($CaptionPath).ToLowerInvariant())
    }
    return $CaptionPath
}
# caption path -> the images that would write it (cat.jpg and cat.png: cat.txt); case-sensitive
# keys (a hashtable ignores case), lower-cased where the file system folds case
$claimed = New-Object 'System.Collections.Generic.Dictionary[string,object]'
foreach ($image in $images) {
    $key = Get-ClaimKey ([System.IO.Path]::ChangeExtension($image, $captionSuffix))
    if (-not $claimed.ContainsKey($key)) { $claimed[$key] = New-Object System.Collections.Generic.List[string] }
    $claimed[$key].Add($image)
}
# Why no caption file can be created at $CaptionPath because its name is longer than the file
# system allows (an image name near 255 bytes, or a long caption extension), or $null: the words
# of vision-client folder, vision-server caption and the bash script, so that image fails before
# it is sent instead of when its caption is written. The file system is asked (ENAMETOOLONG is a
# PathTooLongException in .NET); only names of more than 64 bytes, as in the bash script.
function Get-CaptionNameProblem([string]$CaptionPath) {
    $name = [System.IO.Path]::GetFileName($CaptionPath)
    $size = [System.Text.Encoding]::UTF8.GetByteCount($name)
    if ($size -le 64) { return $null }
    try { $null = [System.IO.File]::GetAttributes($CaptionPath) }
    catch [System.IO.PathTooLongException] {
        return ('the name of its caption file ({0} bytes) is too long for the file system; rename the image to a shorter name' -f $size)
    }
    catch { }
    return $null
}
$skipped = 0
foreach ($image in $images) {
    $captionPath = [System.IO.Path]::ChangeExtension($image, $captionSuffix)
    $key = Get-ClaimKey $captionPath
    if ($claimed[$key].Count -gt 1) {
        # A caption file that several images share is paired with all of them by a trainer:
        # none is captioned, even when it exists, as in vision-client folder and the bash script.
        $others = @($claimed[$key] | Where-Object { $_ -cne $image } | ForEach-Object { ConvertTo-VisionPrintable ([System.IO.Path]::GetFileName($_)) })
        $captionName = ConvertTo-VisionPrintable ([System.IO.Path]::GetFileName($captionPath))
        if ($others.Count -eq 1) {
            $reason = 'shares its caption file {0} with {1}; neither is captioned, rename one of them' -f $captionName, $others[0]
        }
        else {
            $reason = 'shares its caption file {0} with {1}; none is captioned, rename all but one' -f $captionName, ($others -join ', ')
        }
        $clashes.Add([pscustomobject]@{ Image = $image; Error = $reason })
        continue
    }
    $nameProblem = Get-CaptionNameProblem $captionPath
    if ($null -ne $nameProblem) {
        $clashes.Add([pscustomobject]@{ Image = $image; Error = $nameProblem })
        continue
    }
    if ([System.IO.Directory]::Exists($captionPath)) {
        # A folder where the caption should go: no mode may skip it or write into it.
        $clashes.Add([pscustomobject]@{
                Image = $image
                Error = (Get-VisionFolderNotACaptionReason -Path $captionPath)
            })
        continue
    }
    if (Test-VisionSpecialFile -Path $captionPath) {
        # A pipe where the caption should go: reading it would wait for a writer forever.
        $clashes.Add([pscustomobject]@{
                Image = $image
                Error = (Get-VisionNotACaptionReason -Path $captionPath)
            })
        continue
    }
    if ($Mode -eq 'skip') {
        $present = $false
        try { $present = Test-VisionCaptionPresent -Path $captionPath } catch { }
        if ($present) {
            $skipped++
            continue
        }
    }
    $work.Add(@{
            BaseUrl     = $baseUrl
            Task        = $task
            ImagePath   = $image
            CaptionPath = $captionPath
            Mode        = $Mode
            Prefix      = $Prefix
            Suffix      = $Suffix
            Separator   = $Separator
            MaxSize     = $MaxSize
            ApiKey      = $ApiKey
            TimeoutSec  = $TimeoutSec
            Retries     = $Retries
            Model       = $Model
        })
}

Write-Host ('{0} images in {1}: {2} to caption, {3} skipped (prompt {4}, mode {5}, server {6})' -f $images.Count, (ConvertTo-VisionPrintable $root), $work.Count, $skipped, $task, $Mode, $baseUrl)
foreach ($clash in $clashes) { Write-FolderError ('FAILED {0}: {1}' -f (ConvertTo-VisionPrintable $clash.Image), $clash.Error) }
if ($work.Count -eq 0) {
    if ($clashes.Count -gt 0) { exit 1 }
    exit 0
}

# --- run --------------------------------------------------------------------------------------

$client = $null
$pool = $null
$running = New-Object System.Collections.Generic.List[object]
$failures = New-Object System.Collections.Generic.List[object]
foreach ($clash in $clashes) { $failures.Add($clash) }
$done = 0
$captioned = 0
$skippedLate = 0   # skipped at their turn: the caption file was written since the listing
$retryQueue = New-Object System.Collections.Generic.Queue[object]   # sent again after an outage
$outageHits = @{}   # image -> how many times its request met an unreachable server
$maxOutageHits = 5  # one more and the image fails alone (a server that crashes on it)
$outage = $false    # the server went away: start nothing until it answers again
$lastConnectError = ''
$aborted = $null
$abortExitCode = 1
$exitCode = 1
$finished = $false   # false in the finally block: Ctrl+C stopped the run
$renamed = [hashtable]::Synchronized(@{})   # caption paths this run moved into place
$activity = 'Captioning {0} images in {1}' -f $work.Count, (ConvertTo-VisionPrintable $root)

try {
    $client = New-VisionHttpClient -TimeoutSec $TimeoutSec -MaxConnections $Jobs
    # A folder run is bulk work: a person's single requests go first, and folder runs take turns.
    $client.DefaultRequestHeaders.Add('X-Priority', 'bulk')
    $client.DefaultRequestHeaders.Add('X-Client-Id', "folder-$PID")

    # One quick request first, GET /prompts (at most 30 s, or -TimeoutSec when shorter, and no
    # retries), as vision-caption-folder-images.sh: a wrong -Url or -Model (HTTP 404), a refused
    # API key or a server that cannot be reached would fail every image in the same way, so they
    # stop the run, with the summary of every early stop. A server that is not up yet (nothing
    # listens, or a proxy answers 502/503 itself) is waited for up to -WaitForServerSec, as one
    # that goes away mid-run, probing with a capped back-off. Anything else (busy, slow, a 500)
    # is only a warning: each image has its own -Retries and -TimeoutSec. The prompt is not
    # checked here: the server refuses it at the first image (exit code 7), in its own words.
    $probeTimeout = 30
    if ($TimeoutSec -gt 0 -and $TimeoutSec -lt 30) { $probeTimeout = $TimeoutSec }
    $probeClient = New-VisionHttpClient -TimeoutSec $probeTimeout -MaxConnections 1
    $startWait = $null
    $pause = 1.0
    try {
        while ($true) {
            try {
                $null = Get-VisionJson -Client $probeClient -BaseUrl $baseUrl -Path (Get-VisionPromptsPath -Model $Model) -ApiKey $ApiKey -TimeoutSec $probeTimeout -Retries 0
                if ($null -ne $startWait) { Write-FolderError ('{0}: server answers; going on' -f $scriptName) }
                break
            }
            catch {
                $failure = $_.Exception
                $kind = [string]$failure.Data['VisionFailure']
                if ($kind -eq 'connect' -and $failure.Data['VisionNotUpYet'] -eq $true -and $WaitForServerSec -gt 0) {
                    if ($null -eq $startWait) {
                        Write-FolderError ('{0}: server not answering yet ({1}); waiting up to {2} s for it (-WaitForServerSec; 0 stops at once)' -f $scriptName, $failure.Message, $WaitForServerSec)
                        $startWait = [System.Diagnostics.Stopwatch]::StartNew()
                    }
                    $left = $WaitForServerSec - $startWait.Elapsed.TotalSeconds
                    if ($left -gt 0) {
                        Start-Sleep -Milliseconds ([int](1000 * [Math]::Min($pause, $left)))
                        $pause = [Math]::Min(5.0, 2 * $pause)
                        continue
                    }
                    # As after an outage mid-run (Wait-FolderServer).
                    $aborted = 'the server cannot be reached (still not after waiting {0} s: {1})' -f $WaitForServerSec, $failure.Message
                    $abortExitCode = 3
                    break
                }
                $stop = Get-FolderStop $kind ($failure.Data['VisionStatus']) ($failure.Message)
                if ($null -ne $stop -and @(2, 3, 6) -contains $stop.Code) {
                    $aborted = $stop.Reason
                    $abortExitCode = $stop.Code
                    if ($stop.Code -eq 2) {
                        # No vision-server at this address (a -Url with a path?), or a -Model it does not serve.
                        $aborted = '{0}: check -Url (the server''s base address, e.g. http://host:54880){1}' -f $failure.Message.TrimEnd('.'), $(if ($Model) { ' and -Model' } else { '' })
                    }
                    break
                }
                Write-FolderError ('{0}: warning: GET /prompts failed ({1}); trying anyway' -f $scriptName, $failure.Message)
                break
            }
        }
    }
    finally {
        $probeClient.Dispose()
    }
    if ($null -ne $aborted) { Write-FolderError ('{0}: stopping: {1}' -f $scriptName, $aborted) }

    # The worker pool: each runspace gets the helper functions; the HttpClient is shared.
    $state = [System.Management.Automation.Runspaces.InitialSessionState]::CreateDefault()
    foreach ($helper in Get-Command -CommandType Function -Name '*-Vision*') {
        $entry = [System.Management.Automation.Runspaces.SessionStateFunctionEntry]::new($helper.Name, $helper.Definition)
        $state.Commands.Add($entry)
    }
    if ($null -eq $aborted) {   # a run stopped by the first request starts no worker
        $pool = [System.Management.Automation.Runspaces.RunspaceFactory]::CreateRunspacePool(1, $Jobs, $state, $Host)
        $pool.Open()
    }
    $workerScript = 'param($Job) Invoke-VisionCaptionImage @Job'

    $watch = [System.Diagnostics.Stopwatch]::StartNew()
    $lastProgress = -1.0
    $next = 0
    while ($running.Count -gt 0 -or (($next -lt $work.Count -or $retryQueue.Count -gt 0) -and $null -eq $aborted)) {
        while ($null -eq $aborted -and -not $outage -and $running.Count -lt $Jobs -and ($retryQueue.Count -gt 0 -or $next -lt $work.Count)) {
            if ($retryQueue.Count -gt 0) {
                $job = $retryQueue.Dequeue()
            }
            else {
                $job = $work[$next]
                $next++
            }
            $job['Client'] = $client
            $job['Renamed'] = $renamed
            $shell = [System.Management.Automation.PowerShell]::Create()
            $shell.RunspacePool = $pool
            [void]$shell.AddScript($workerScript).AddArgument($job)
            $running.Add([pscustomobject]@{ Shell = $shell; Handle = $shell.BeginInvoke(); Image = $job.ImagePath; Job = $job })
        }
        if ($running.Count -eq 0) {
            # Every request in flight has come back: with the server gone, wait for it here.
            # Not once the run is stopping (a refused key, a 404 met meanwhile): the wait would
            # overwrite that reason and, with the server back, start the images again (as the
            # bash script, which waits only while no stop was recorded).
            if ($outage -and $null -eq $aborted) {
                $outage = $false
                $aborted = Wait-FolderServer $lastConnectError
                if ($null -ne $aborted) { $abortExitCode = 3 }
            }
            continue
        }

        $handles = [System.Threading.WaitHandle[]]@(foreach ($item in $running) { $item.Handle.AsyncWaitHandle })
        [void][System.Threading.WaitHandle]::WaitAny($handles, 250)

        for ($i = $running.Count - 1; $i -ge 0; $i--) {
            $item = $running[$i]
            if (-not $item.Handle.IsCompleted) { continue }
            $running.RemoveAt($i)
            $result = $null
            try {
                $output = $item.Shell.EndInvoke($item.Handle)
                if ($output.Count -gt 0) { $result = $output[$output.Count - 1] }
                if ($null -eq $result) {
                    $reason = 'the worker returned nothing'
                    if ($item.Shell.Streams.Error.Count -gt 0) { $reason = $item.Shell.Streams.Error[0].ToString() }
                    $result = [pscustomobject]@{ Image = $item.Image; Ok = $false; Error = $reason; Failure = $null; Seconds = 0.0 }
                }
            }
            catch {
                $result = [pscustomobject]@{ Image = $item.Image; Ok = $false; Error = $_.Exception.Message; Failure = $null; Seconds = 0.0 }
            }
            finally {
                $item.Shell.Dispose()
            }

            if (-not $result.Ok -and $result.Failure -eq 'connect' -and $WaitForServerSec -gt 0) {
                # The server went away (a restart?): no caption was written, so send this image
                # again once it answers; nothing new starts until then.
                $hits = 1
                if ($outageHits.ContainsKey($item.Image)) { $hits = $outageHits[$item.Image] + 1 }
                $lastConnectError = $result.Error
                if ($hits -le $maxOutageHits) {
                    $outageHits[$item.Image] = $hits
                    $retryQueue.Enqueue($item.Job)
                    $outage = $true
                    continue
                }
                $result.Error = 'the connection broke {0} times around this image (does the server crash on it?): {1}' -f $hits, $result.Error
                $result.Failure = $null
                $result.Status = $null
            }
            if (-not $result.Ok) {
                # An answer every other image would get too (the server unreachable, busy after
                # -Retries, refusing the key or the prompt): stop, and report it once. Nothing is
                # wrong with this image: it counts as not attempted, as in the other folder captioners.
                $stop = Get-FolderStop ([string]$result.Failure) ($result.Status) ($result.Error)
                if ($null -ne $stop) {
                    if ($null -eq $aborted) {
                        $aborted = $stop.Reason
                        $abortExitCode = $stop.Code
                        Write-FolderError ('{0}: stopping: {1}' -f $scriptName, $aborted)
                    }
                    continue
                }
            }
            $done++
            if ($result.Ok -and $result.Skipped) {
                # Its caption file was written meanwhile (another run, the gallery): left as it is.
                $skipped++
                $skippedLate++
                if (-not $Quiet) { Write-Host ('[{0}/{1}] skipped {2}: {3}' -f $done, $work.Count, (ConvertTo-VisionPrintable $result.Image), $result.Error) }
            }
            elseif ($result.Ok) {
                $captioned++
                if (-not $Quiet) { Write-Host ('[{0}/{1}] {2} ({3:N1} s)' -f $done, $work.Count, (ConvertTo-VisionPrintable $result.Image), $result.Seconds) }
            }
            else {
                $failures.Add($result)
                Write-FolderError ('[{0}/{1}] FAILED {2}: {3}' -f $done, $work.Count, (ConvertTo-VisionPrintable $result.Image), $result.Error)
            }
        }

        $elapsed = $watch.Elapsed.TotalSeconds
        if ($elapsed - $lastProgress -ge 0.5 -or ($running.Count -eq 0 -and $next -ge $work.Count)) {
            $lastProgress = $elapsed
            $rate = 0.0
            if ($elapsed -gt 0) { $rate = $done / $elapsed }
            $eta = -1.0
            if ($rate -gt 0) { $eta = ($work.Count - $done) / $rate }
            $percent = [int][Math]::Floor(100.0 * $done / $work.Count)
            $status = '{0}/{1} images, {2:N2} img/s, ETA {3}, {4} failed' -f $done, $work.Count, $rate, (Format-Duration $eta), ($failures.Count - $clashes.Count)
            Write-Progress -Activity $activity -Status $status -PercentComplete $percent
        }
    }
    Write-Progress -Activity $activity -Completed

    $seconds = $watch.Elapsed.TotalSeconds
    $rate = 0.0
    if ($seconds -gt 0) { $rate = $done / $seconds }
    # "N captioned, N skipped, N failed", the words of the other folder captioners.
    Write-Host ('{0} captioned, {1} skipped, {2} failed in {3} ({4:N2} img/s)' -f $captioned, $skipped, $failures.Count, (Format-Duration $seconds), $rate)
    if ($null -ne $aborted) {
        # The words of every folder captioner; the exit code says the cause.
        Write-FolderError ('Stopped early, {0} image(s) not attempted: {1}' -f ($work.Count - $done), $aborted)
    }
    if ($failures.Count -gt 0) {
        Write-FolderError ('{0} images failed (they have no new caption; run again to retry them):' -f $failures.Count)
        foreach ($failure in ($failures | Sort-Object Image)) {
            Write-FolderError ('  {0}: {1}' -f (ConvertTo-VisionPrintable $failure.Image), $failure.Error)
        }
    }
    if ($null -ne $aborted) { $exitCode = $abortExitCode }
    elseif ($failures.Count -eq 0) { $exitCode = 0 }
    $finished = $true
}
catch {
    if ($null -ne $aborted) {
        Write-FolderError ('{0}: {1}' -f $scriptName, $aborted)
    }
    else {
        Write-FolderError ('{0}: {1}' -f $scriptName, $_.Exception.Message)
    }
    $exitCode = $abortExitCode
    $finished = $true
}
finally {
    # Also reached on Ctrl+C: stop the workers (each notices within 0.2 s and removes its
    # temporary file), then release the pool and the connection. After Ctrl+C the summary
    # counts every caption this run put in place, also one a worker finished (or moved into
    # place just before it was stopped) after the last one counted, as the bash script does.
    foreach ($item in $running) {
        if (-not $finished -and $item.Handle.IsCompleted) {
            try {
                $output = $item.Shell.EndInvoke($item.Handle)
                if ($output.Count -gt 0) {
                    $result = $output[$output.Count - 1]
                    if ($result.Ok -and $result.Skipped) { $skipped++; $skippedLate++ }
                    elseif ($result.Ok) { $captioned++ }
                    elseif ($null -eq (Get-FolderStop ([string]$result.Failure) ($result.Status) ($result.Error))) {
                        $failures.Add($result)   # not one that would have stopped the run: not attempted
                    }
                }
            }
            catch { }
        }
        else {
            try { $item.Shell.Stop() } catch { }
            if (-not $finished -and $renamed.ContainsKey($item.Job.CaptionPath)) { $captioned++ }
        }
        $item.Shell.Dispose()
    }
    if (-not $finished) {
        $left = $work.Count - $captioned - $skippedLate - ($failures.Count - $clashes.Count)
        Write-FolderError ('{0}: interrupted; {1} captioned, {2} skipped, {3} failed' -f $scriptName, $captioned, $skipped, $failures.Count)
        foreach ($failure in ($failures | Sort-Object Image)) {
            Write-FolderError ('  {0}: {1}' -f (ConvertTo-VisionPrintable $failure.Image), $failure.Error)
        }
        Write-FolderError ('Interrupted: {0} image(s) not captioned yet (the ones in flight were dropped; nothing is half-written); run the same command again to resume.' -f $left)
    }
    if ($null -ne $pool) { $pool.Dispose() }
    if ($null -ne $client) { $client.Dispose() }
    # Ctrl+C: exit 130 as the other folder captioners. Without this, 'powershell -File' and
    # 'pwsh -File' report 0 for a script stopped by Ctrl+C (PowerShell issue 13523), and a
    # wrapper would take the interrupted run for a finished one. An exit in a script (not
    # [Environment]::Exit) leaves an interactive console open.
    if (-not $finished) { exit 130 }
}
exit $exitCode
