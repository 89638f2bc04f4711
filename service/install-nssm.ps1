<#
.SYNOPSIS
    Installs vision-server as a Windows service with NSSM (https://nssm.cc).

.DESCRIPTION
    Runs "vision-server.exe serve" from a virtualenv as a service that starts with Windows,
    restarts when it fails, writes rotated log files, and gets enough time to drain on stop:
    NSSM stops a console program by sending Ctrl+C, which vision-server answers like SIGTERM
    (refuse new jobs, finish queued ones within the grace period, unload, exit 0).

    Run from an elevated PowerShell. Re-running it updates an existing service.

.EXAMPLE
    .\install-nssm.ps1 -VenvDir C:\vision-server\venv -ListenHost 0.0.0.0 -ApiKeyFile C:\vision-server\api-key.txt
#>
[CmdletBinding()]
param(
    [string]$ServiceName = "vision-server",
    # The virtualenv that has vision-server installed (pip install vision-server / pip install -e .).
    [string]$VenvDir = "C:\vision-server\venv",
    # Working directory, logs and caches live below this folder.
    [string]$DataDir = "C:\ProgramData\vision-server",
    [string]$ListenHost = "127.0.0.1",
    [int]$Port = 54880,
    [string]$Model = "MiaoshouAI/Florence-2-large-PromptGen-v2.0",
    [string]$ApiKeyFile = "",
    # A config.toml for every other setting (docs/configuration.md); the service account's own
    # config folder is hard to find, so name the file here.
    [string]$ConfigFile = "",
    [int]$ShutdownGraceSeconds = 60,
    # Run as this account (e.g. "NT AUTHORITY\NetworkService"); LocalSystem when empty.
    [string]$Account = "",
    [string]$Nssm = "nssm.exe"
)

$ErrorActionPreference = "Stop"

# A path to nssm.exe is taken as it is written (-LiteralPath: a folder such as "C:\tools [x64]"
# is no wildcard pattern); a bare name is looked up on the PATH.
$nssmExe = $null
if ($Nssm -match '[\\/]') {
    if (Test-Path -LiteralPath $Nssm -PathType Leaf) { $nssmExe = (Resolve-Path -LiteralPath $Nssm).ProviderPath }
}
else {
    $nssmExe = (Get-Command $Nssm -CommandType Application -ErrorAction SilentlyContinue | Select-Object -First 1).Source
}
if (-not $nssmExe) {
    throw "nssm.exe not found. Install it (e.g. 'winget install NSSM.NSSM' or 'choco install nssm') or pass -Nssm C:\path\to\nssm.exe."
}
# NSSM needs full paths; they are joined as strings: Join-Path -Path takes wildcards, and [ ] in
# a folder name are not.
$VenvDir = $ExecutionContext.SessionState.Path.GetUnresolvedProviderPathFromPSPath($VenvDir)
$DataDir = $ExecutionContext.SessionState.Path.GetUnresolvedProviderPathFromPSPath($DataDir)
$exe = [System.IO.Path]::Combine($VenvDir, "Scripts", "vision-server.exe")
# -LiteralPath: a -VenvDir with [ ] in it (C:\venvs\[test]) is a path, not a wildcard pattern.
if (-not (Test-Path -LiteralPath $exe -PathType Leaf)) {
    throw "$exe not found. Create the virtualenv and 'pip install' vision-server into it first."
}
if ($ConfigFile) {
    $ConfigFile = $ExecutionContext.SessionState.Path.GetUnresolvedProviderPathFromPSPath($ConfigFile)
    if (-not (Test-Path -LiteralPath $ConfigFile -PathType Leaf)) {
        throw "$ConfigFile not found. Write the config file first, or leave -ConfigFile out."
    }
}

$logDir = [System.IO.Path]::Combine($DataDir, "logs")
$cacheDir = [System.IO.Path]::Combine($DataDir, "cache")
New-Item -ItemType Directory -Force -Path $DataDir, $logDir, $cacheDir | Out-Null

function Invoke-Nssm {
    & $nssmExe @args | Out-Null
    if ($LASTEXITCODE -ne 0) { throw "nssm $($args -join ' ') failed with exit code $LASTEXITCODE" }
}

$existing = Get-Service -Name $ServiceName -ErrorAction SilentlyContinue
if ($existing) {
    Write-Host "Updating service $ServiceName"
    if ($existing.Status -ne "Stopped") { Invoke-Nssm stop $ServiceName }
    Invoke-Nssm set $ServiceName Application $exe
} else {
    Write-Host "Installing service $ServiceName"
    Invoke-Nssm install $ServiceName $exe
}

Invoke-Nssm set $ServiceName AppParameters "serve"
Invoke-Nssm set $ServiceName AppDirectory $DataDir
Invoke-Nssm set $ServiceName DisplayName "vision-server (Florence-2 captioning)"
Invoke-Nssm set $ServiceName Description "On-demand Florence-2 / PromptGen image captioning daemon on port $Port."
Invoke-Nssm set $ServiceName Start SERVICE_DELAYED_AUTO_START
if ($Account) { Invoke-Nssm set $ServiceName ObjectName $Account }

# Settings as VISION_SERVER_* variables. A variable wins over the config file, so the host, port,
# model, cache and grace period are changed by running this script again, not in -ConfigFile.
$environment = @(
    "PYTHONUNBUFFERED=1",
    "VISION_SERVER_HOST=$ListenHost",
    "VISION_SERVER_PORT=$Port",
    "VISION_SERVER_MODEL=$Model",
    "VISION_SERVER_CACHE_DIR=$cacheDir",
    "HF_HOME=$([System.IO.Path]::Combine($cacheDir, 'huggingface'))",
    "VISION_SERVER_SHUTDOWN_GRACE=$ShutdownGraceSeconds"
)
if ($ApiKeyFile) { $environment += "VISION_SERVER_API_KEY_FILE=$ApiKeyFile" }
if ($ConfigFile) { $environment += "VISION_SERVER_CONFIG=$ConfigFile" }
Invoke-Nssm set $ServiceName AppEnvironmentExtra @environment

# Logs: append, rotate at 10 MB, also while running.
$log = [System.IO.Path]::Combine($logDir, "vision-server.log")
Invoke-Nssm set $ServiceName AppStdout $log
Invoke-Nssm set $ServiceName AppStderr $log
Invoke-Nssm set $ServiceName AppStdoutCreationDisposition 4
Invoke-Nssm set $ServiceName AppStderrCreationDisposition 4
Invoke-Nssm set $ServiceName AppRotateFiles 1
Invoke-Nssm set $ServiceName AppRotateOnline 1
Invoke-Nssm set $ServiceName AppRotateBytes 10485760

# Restart on any exit that was not asked for; back off when it dies right after starting.
Invoke-Nssm set $ServiceName AppExit Default Restart
Invoke-Nssm set $ServiceName AppRestartDelay 5000
Invoke-Nssm set $ServiceName AppThrottle 10000

# Stopping: Ctrl+C first, and wait for the drain (grace + the last batch + unload) before NSSM
# escalates to WM_CLOSE, WM_QUIT and finally TerminateProcess.
$drainMs = ($ShutdownGraceSeconds + 30) * 1000
Invoke-Nssm set $ServiceName AppStopMethodSkip 0
Invoke-Nssm set $ServiceName AppStopMethodConsole $drainMs
Invoke-Nssm set $ServiceName AppStopMethodWindow 1500
Invoke-Nssm set $ServiceName AppStopMethodThreads 1500
Invoke-Nssm set $ServiceName AppKillProcessTree 1

Invoke-Nssm start $ServiceName
# The probe goes where the server listens: loopback for the "any address" binds, else that address.
$probeHost = $ListenHost
if ($ListenHost -in @('0.0.0.0', '::', '')) { $probeHost = '127.0.0.1' }
elseif ($ListenHost.Contains(':')) { $probeHost = "[$ListenHost]" }
Write-Host "Started $ServiceName. Probe: Invoke-RestMethod http://${probeHost}:$Port/health"
Write-Host "Logs: $log"
