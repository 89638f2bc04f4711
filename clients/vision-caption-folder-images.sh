#!/usr/bin/env bash
# vision-caption-folder-images.sh: write a caption file beside every image in a folder, using
# vision-client.sh (found beside this script) against a vision-server. Run with --help.
set -euo pipefail

PROG=${0##*/}
IMAGE_EXTS=(jpg jpeg png gif bmp tif tiff webp)

usage() {
    cat <<EOF
Usage: $PROG [options] <PROMPT> <ext> <folder>

Captions every image in <folder> and its subfolders (extensions ${IMAGE_EXTS[*]},
any case) and writes each caption beside its image, with the image's suffix replaced by <ext>:
"cat.png" gets "cat.txt" for <ext> txt (give <ext> without the dot).

PROMPT is a task such as CAPTION, DETAILED_CAPTION, MORE_DETAILED_CAPTION, GENERATE_TAGS or
MIXED_CAPTION_PLUS, in any case, with or without the angle brackets: CAPTION, caption and
<CAPTION> are the same ("vision-client.sh prompts" lists them).

Options:
  --mode MODE      what to do when a caption file already exists (default: skip):
                     skip       leave images whose caption file has text alone
                                (so an interrupted run continues where it stopped),
                                also one that gets a caption while the run goes
                     overwrite  replace the caption
                     append     add the new caption after the existing text
                     prepend    add the new caption before the existing text
  --separator TEXT put TEXT between the old and new text in append/prepend mode (default: " ")
  --prefix TEXT    put TEXT before every new caption, as is (e.g. --prefix "ohwx, ")
  --suffix TEXT    put TEXT after every new caption, as is
  --jobs N, -j N   send N images at a time, so the server can batch them (default: 4)
  --no-recursive   only the images directly in <folder>, not in its subfolders
  --url URL        server address (default: \$VISION_HOST, else http://127.0.0.1:54880)
  --timeout SEC    per-image time limit in seconds (default: \$VISION_TIMEOUT, else 300)
  --retries N      send an image again up to N times while the server answers busy (HTTP 429,
                   502/503), after its Retry-After (at most 120 s) or 0.5, 1, 2, 4... s (at
                   most 30 s), each with a little jitter (default: 5; the schedule and default
                   of every client)
  --wait-for-server SEC
                   when the server goes away mid-run (a restart, a deploy), pause and wait up
                   to SEC seconds for it to answer again, then send the images that were in
                   flight again; after that the run stops early (exit status 3) and says how
                   many images were not attempted (default: 300; 0: stop at once). A host that
                   does not answer the connection, and a proxy (HAProxy) that answers 502/503
                   itself because no server behind it is up, count as gone too. A server that
                   is not up yet at the start (connection refused, or such a proxy answer) is
                   waited for the same way; a host name that does not resolve, a refused API
                   key or an address without a vision-server (HTTP 404) stop the run at once
  -q, --quiet      no progress output; failures and the summary are still printed
  -h, --help       show this help and exit

VISION_API_KEY, when set, is sent as the API key. VISION_MODEL, when set, names which of the
server's models captions (the server's default model without it).

A caption is written to a hidden temporary file in the image's folder
(.vision-caption.<16 hex digits>.tmp) and renamed into place only when it is complete, so an
error, a dead server or Ctrl+C never leaves a partial or wrong caption file (nor temporary
files). Such temporary files that a killed run (kill -9, a power cut) left behind, older than
15 minutes, are deleted at the start, in the folders this run captions; it says how many.
A caption file without write permission (chmod a-w, judged by its mode bits, also for root) is
never replaced, in any mode: its image fails ("make it writable (chmod u+w) to let it be
replaced"). A replaced caption file keeps its permissions; a symlinked one becomes a plain file
and the file it points to is never written (as in vision-client folder and vision-server caption).
Each line break in the server's caption becomes a space (trainers read caption files by lines;
vision-client folder and vision-server caption do the same; --prefix, --suffix and --separator
are written as given), and the file has no trailing newline.

Names that start with "." below <folder> are no part of the dataset: hidden files (macOS
"._name" files too) are not captioned, hidden folders (.ipynb_checkpoints, .cache) not entered;
give such a folder as <folder> to caption it. A broken symlink, a symlink loop or a FIFO named
like an image, and an image whose caption file name would be too long for the file system, fail
with their reason before anything is sent (as in vision-client folder and vision-server caption).

Images with the same name but another extension (a.jpg and a.png) would share one caption file
(a.txt) that a trainer pairs with both: none of them is captioned and each is reported as
failed, also when a.txt already exists (it is left as it is); rename all but one of them. So do
b.jpg and B.png in a folder whose file system folds case (macOS, Windows, exFAT, a Samba share),
where b.txt and B.txt are one file; the script asks the file system, not the platform.

Progress (count/total, images per second and ETA) goes to stderr, then a summary that lists
every image that failed and why. The run stops early when the server cannot be reached for
longer than --wait-for-server (at the start or mid-run), stays busy after the retries, rejects
the API key or the prompt, or answers HTTP 404 (also mid-run: a server restarted without
VISION_MODEL), also at the first request (GET /prompts, at most 30 s or --timeout, no
retries). A busy, slow or failing (HTTP 500) answer to that request is only a warning
("trying anyway"): each image has its own --retries and --timeout. Ctrl+C before the images
are listed says that no image was attempted. An image whose request keeps breaking the connection (six times: a
server that crashes on it) fails alone.

Exit status (the same in vision-client folder and the .ps1 folder script): 0 all images
captioned or skipped; 1 some images failed; 2 usage error (also an address without a
vision-server, or a VISION_MODEL it does not serve: HTTP 404, at the start or mid-run); the run stopped
early: 3 the server cannot be reached (also a host name that does not resolve, TLS trouble),
5 the server stays busy after --retries, 6 the API key is refused, 7 the server refuses the
prompt; 130 interrupted (Ctrl+C); 143 stopped by SIGTERM. A full disk (no space left for a
caption file, or a quota) stops the run early too, with exit status 1: free some space and run
the same command again to resume.

Examples:
  $PROG DETAILED_CAPTION txt ~/datasets/cats
  $PROG --mode prepend --prefix "ohwx, " --jobs 8 GENERATE_TAGS txt ./images
EOF
}

say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
    local code=$1
    shift
    say "$@"
    exit "$code"
}
usage_error() {
    say "$*"
    printf "Try '%s --help'.\n" "$PROG" >&2
    exit 2
}

# printable_into VAR TEXT: TEXT (a file name) on one line, as every report of this project shows
# names (vision_server.captionfiles.printable): each byte that is not part of valid UTF-8 as \xNN
# (a name from an archive made under another encoding: "caf\xe9.png"), a line break or tab as \n,
# \r or \t, any other control character as \xNN, so a name can neither cut a message short nor
# pass for a line of its own (nor send a terminal escape). Valid UTF-8 (accents, CJK, emoji)
# stays as it is whatever the locale: the bytes are looked at under LC_ALL=C. A name that is not
# all ASCII is checked with one regex; only an invalid one is walked byte by byte.
printable_into() {
    local LC_ALL=C
    local _t=$2 _i _x _c _b _n _k _lo _hi _out
    if [[ $_t == *[[:cntrl:]]* ]]; then
        _t=${_t//$'\n'/\\n}
        _t=${_t//$'\r'/\\r}
        _t=${_t//$'\t'/\\t}
        for ((_i = 1; _i < 128; _i++)); do
            ((_i < 32 || _i == 127)) || continue
            printf -v _x '%02x' "$_i"
            printf -v _c '%b' "\\x$_x"
            _t=${_t//"$_c"/\\x$_x}
        done
    fi
    if [[ $_t == *[![:ascii:]]* ]]; then
        [[ -n $utf8_re ]] || utf8_re_init
        if ! [[ $_t =~ $utf8_re ]]; then
            _out="" _i=0
            while ((_i < ${#_t})); do
                # The byte at _i starts a sequence of _n more bytes, the first of them in _lo.._hi
                # and the rest in 0x80..0xbf (Unicode's table of well-formed UTF-8), or none (-1).
                printf -v _b '%d' "'${_t:_i:1}"
                if ((_b < 0x80)); then _n=0
                elif ((_b < 0xc2)); then _n=-1
                elif ((_b < 0xe0)); then _n=1
                elif ((_b < 0xf0)); then _n=2
                elif ((_b < 0xf5)); then _n=3
                else _n=-1
                fi
                _lo=0x80 _hi=0xbf
                ((_b != 0xe0)) || _lo=0xa0 # no overlong forms
                ((_b != 0xf0)) || _lo=0x90
                ((_b != 0xed)) || _hi=0x9f # no surrogates
                ((_b != 0xf4)) || _hi=0x8f # nothing past U+10FFFF
                for ((_k = 1; _k <= _n; _k++)); do
                    printf -v _c '%d' "'${_t:_i+_k:1}"
                    if ((_c < _lo || _c > _hi)); then
                        _n=-1
                        break
                    fi
                    _lo=0x80 _hi=0xbf
                done
                if ((_n < 0)); then # this byte alone, as Python's "backslashreplace" says it
                    printf -v _c '\\x%02x' "$_b"
                    _out+=$_c
                    _i=$((_i + 1))
                else
                    _out+=${_t:_i:_n+1}
                    _i=$((_i + _n + 1))
                fi
            done
            _t=$_out
        fi
    fi
    printf -v "$1" '%s' "$_t"
}

# utf8_re_init: utf8_re, an extended regex that text matches under LC_ALL=C when it is all valid
# UTF-8. Each class lists its bytes one by one: what a range of bytes past 0x7f means is up to
# the C library.
utf8_re=""
utf8_re_init() {
    local LC_ALL=C
    local _any _tail _2 _3 _3b _4 _e0 _ed _f0 _f4
    bytes_into _any 0x80 0xff
    bytes_into _tail 0x80 0xbf
    bytes_into _2 0xc2 0xdf
    bytes_into _3 0xe1 0xec
    bytes_into _3b 0xee 0xef
    bytes_into _4 0xf1 0xf3
    bytes_into _e0 0xa0 0xbf
    bytes_into _ed 0x80 0x9f
    bytes_into _f0 0x90 0xbf
    bytes_into _f4 0x80 0x8f
    utf8_re="^([^$_any]|[$_2][$_tail]|"$'\xe0'"[$_e0][$_tail]|[$_3$_3b][$_tail][$_tail]|"
    utf8_re+=$'\xed'"[$_ed][$_tail]|"$'\xf0'"[$_f0][$_tail][$_tail]|[$_4][$_tail][$_tail][$_tail]|"
    utf8_re+=$'\xf4'"[$_f4][$_tail][$_tail])*\$"
}

# bytes_into VAR FIRST LAST: the bytes FIRST..LAST, one after the other.
bytes_into() {
    local _s="" _i _x
    for ((_i = $2; _i <= $3; _i++)); do
        printf -v _x '\\x%02x' "$_i"
        _s+=$_x
    done
    printf -v "$1" '%b' "$_s"
}

if ((BASH_VERSINFO[0] < 4)); then
    die 2 "needs bash 4 or newer (this is bash $BASH_VERSION)"
fi

# The directory this script really lives in (following symlinks), to find vision-client.sh.
script_dir() {
    local src=${BASH_SOURCE[0]} dir
    while [[ -L $src ]]; do
        dir=$(cd -P -- "$(dirname -- "$src")" && pwd)
        src=$(readlink -- "$src")
        [[ $src == /* ]] || src=$dir/$src
    done
    cd -P -- "$(dirname -- "$src")" && pwd
}

# ---------------------------------------------------------------------------------------------
# Arguments

mode=skip
separator=" "
prefix=""
suffix=""
jobs=4
recursive=1
quiet=0
retries=5 # the default of every folder captioner
wait_for_server=300
timeout=${VISION_TIMEOUT:-300}
client_opts=()
args=()

need_value() {
    (($2 >= 2)) || usage_error "option $1 needs a value"
}

while (($#)); do
    opt=$1
    value=""
    case $opt in
    --*=*)
        value=${opt#*=}
        opt=${opt%%=*}
        shift
        ;;
    --mode | --separator | --prefix | --suffix | --jobs | -j | --url | --timeout | --retries | --wait-for-server)
        need_value "$opt" $#
        value=$2
        shift 2
        ;;
    *) shift ;;
    esac
    case $opt in
    -h | --help)
        usage
        exit 0
        ;;
    --mode) mode=$value ;;
    --separator) separator=$value ;;
    --prefix) prefix=$value ;;
    --suffix) suffix=$value ;;
    --jobs | -j) jobs=$value ;;
    --url) client_opts+=(--url "$value") ;;
    --timeout) timeout=$value ;;
    --retries) retries=$value ;;
    --wait-for-server) wait_for_server=$value ;;
    --no-recursive) recursive=0 ;;
    --recursive) recursive=1 ;;
    -q | --quiet) quiet=1 ;;
    --)
        args+=("$@")
        break
        ;;
    -?*) usage_error "unknown option: $opt" ;;
    *) args+=("$opt") ;;
    esac
done

((${#args[@]} == 3)) || usage_error "expected <PROMPT> <ext> <folder>, got ${#args[@]} argument(s)"
prompt=${args[0]}
ext=${args[1]#.}
folder=${args[2]}

case $mode in skip | overwrite | append | prepend) ;; *) usage_error "--mode must be skip, overwrite, append or prepend, not '$mode'" ;; esac
if ! [[ $jobs =~ ^[0-9]+$ ]] || ((jobs < 1 || jobs > 256)); then
    usage_error "--jobs must be a number from 1 to 256, not '$jobs'"
fi
[[ $retries =~ ^[0-9]+$ ]] || usage_error "--retries must be a whole number, not '$retries'"
[[ $wait_for_server =~ ^[0-9]{1,7}$ ]] ||
    usage_error "--wait-for-server must be a whole number of seconds, not '$wait_for_server'"
wait_for_server=$((10#$wait_for_server))
[[ $timeout =~ ^[0-9]+([.][0-9]+)?$ && ! $timeout =~ ^0+([.]0*)?$ ]] ||
    usage_error "--timeout must be a positive number of seconds, not '$timeout'"
client_opts+=(--timeout "$timeout")
[[ -n $(printf '%s' "$prompt" | tr -d '<>[:space:]') ]] || usage_error "the prompt is empty"
[[ $ext =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*$ ]] || usage_error "invalid caption extension '${args[1]}' (give it without the dot, e.g. txt)"
for e in "${IMAGE_EXTS[@]}"; do
    [[ ${ext,,} != "$e" ]] || usage_error "the caption extension must not be an image extension ('$ext' would overwrite the images)"
done
[[ -d $folder ]] || usage_error "not a folder: $folder"
[[ $folder == -* ]] && folder=./$folder
while [[ $folder == */ && $folder != / ]]; do folder=${folder%/}; done

client=${VISION_CLIENT:-$(script_dir)/vision-client.sh}
[[ -f $client ]] || die 2 "cannot find vision-client.sh (looked for $client)"
client_name=${client##*/}
client_cmd=(bash "$client" "${client_opts[@]}")
# A folder run is bulk work: a person's single requests go first, and folder runs take turns.
export VISION_PRIORITY=${VISION_PRIORITY:-bulk}
export VISION_CLIENT_ID=${VISION_CLIENT_ID:-folder-$$}

# ---------------------------------------------------------------------------------------------
# Run state, temporary files and signals

tmpd=""
new_dir=""
declare -a todo=() todo_cap=() temp_ids=()
declare -A running=() # index -> worker pid
next=0
interrupted=-1 # -1: not interrupted; else the number of images in flight when it was
collecting=0     # 1 while collect counts a finished image: a signal waits for it to end
deferred_signal=0 # the exit status of a signal that came meanwhile
declare -a failed=() # "image<TAB>reason" lines for the summary
total_found=0
skipped=0
total=0
n_ok=0
n_failed=0
n_aborted=0
n_meanwhile=0 # skipped at the write: their caption file was written meanwhile
# A skip-mode run finds the caption file it was to write already there (vision-client folder's words).
WRITTEN_MEANWHILE="its caption file was written meanwhile (by another run, or saved in the gallery); left as it is"
abort_rc=0
abort_reason=""
start_us=0
outage=0               # 1 while the server is unreachable: no new images start
declare -a retry_q=()  # images whose request the outage broke: sent again first
declare -A outage_hits=() # index -> how many times its request met an unreachable server
max_outage_hits=5      # one more and the image fails alone (a server that crashes on it)
declare -A stop_hits=() # index -> how many times a signal stopped its request (sent again once)

# Whether "sync FILE" flushes one file to the disk (GNU coreutils 8.24+, BusyBox): each caption
# is flushed before it is put in place, as the Python tools do, so a power cut cannot leave an
# empty file under the caption's name. BSD and macOS sync takes no file (it flushes everything):
# there the file system's own ordering is all there is.
sync_files=0
if sync --help 2>&1 | grep -e 'FILE' >/dev/null; then sync_files=1; fi # (grep -q could cut sync off: pipefail)

# random_hex16: 16 random lowercase hex digits. Temporary captions are named
# .vision-caption.<16 hex>.tmp by every vision-server client, so any of them can sweep a
# killed run's leftovers.
random_hex16() {
    local hex
    hex=$(od -An -tx1 -N8 /dev/urandom 2>/dev/null | tr -d ' \n')
    if [[ ! $hex =~ ^[0-9a-f]{16}$ ]]; then
        printf -v hex '%04x%04x%04x%04x' "$RANDOM" "$RANDOM" "$RANDOM" "$RANDOM"
    fi
    printf '%s' "$hex"
}

# new_temp_id INDEX: draw image INDEX's random part, without a subshell when bash has $SRANDOM
# (5.1+; see show_into).
new_temp_id() {
    if [[ -n ${SRANDOM:-} ]]; then
        printf -v "temp_ids[$1]" '%08x%08x' "$SRANDOM" "$SRANDOM"
    else
        temp_ids[$1]=$(random_hex16)
    fi
}

# temp_caption INDEX: the hidden temporary file that becomes the caption of image INDEX (its
# random part is drawn in the main shell when the image starts, so cleanup knows it too).
temp_caption() {
    local cap=${todo_cap[$1]}
    printf '%s/.vision-caption.%s.tmp' "${cap%/*}" "${temp_ids[$1]}"
}

# stop_workers: stop every background job and wait for it, also one that a signal caught before
# its pid was recorded; each worker stops its own vision-client.sh, which stops its curl and
# removes its files.
# shellcheck disable=SC2317,SC2329  # called by traps
stop_workers() {
    # A trap can run inside "IFS= read ...", whose empty IFS would keep $pids from splitting.
    local pids IFS=$' \t\n'
    pids=$(jobs -p)
    # shellcheck disable=SC2086  # one pid per word
    if [[ -n $pids ]]; then kill -TERM $pids 2>/dev/null || true; fi
    wait 2>/dev/null || true
}

# shellcheck disable=SC2317,SC2329  # called by traps
cleanup() {
    trap '' HUP INT TERM # a second signal (Ctrl+C twice, or a process group) must not cut this short
    local idx
    local -a temps=()
    for idx in "${!running[@]}"; do
        temps+=("$(temp_caption "$idx")")
    done
    stop_workers
    # Belt and braces: the workers remove their temporary captions themselves when stopped.
    if ((${#temps[@]})); then rm -f -- "${temps[@]}"; fi
    running=()
    if [[ -n $tmpd ]]; then
        rm -rf -- "$tmpd"
    elif [[ -n $new_dir ]]; then
        rmdir -- "$new_dir" 2>/dev/null || true # empty: only just created
    fi
    tmpd="" new_dir=""
}

# shellcheck disable=SC2317,SC2329  # called by traps
on_signal() {
    if ((collecting)); then # half-way through counting an image: finish that first (collect)
        deferred_signal=$1
        return 0
    fi
    trap '' HUP INT TERM
    deferred_signal=0
    if [[ -t 2 ]] && ((!quiet)); then printf '\r\033[K' >&2; fi
    say "interrupted; stopping the running requests"
    stop_workers
    # A worker may have finished after the last one this shell counted: its caption renamed into
    # place and its result written (a worker stopped right after the rename writes it then too).
    # Count those now, so "captioned" is every caption file this run put on disk, and only the
    # images without a new caption are left as interrupted.
    local idx
    for idx in "${!running[@]}"; do
        if [[ -n $tmpd && -f $tmpd/res.$idx ]]; then collect "$idx"; fi
    done
    # Every image this run started and did not finish: also one whose worker the signal caught
    # being started, before "running" (or "next") knew of it. Each started image is captioned,
    # failed, stopped early, waiting to be sent again, or this.
    interrupted=$((next - n_ok - n_failed - n_aborted - ${#retry_q[@]}))
    ((interrupted >= 0)) || interrupted=0
    cleanup
    if declare -F report >/dev/null; then
        report
    else # still checking the server or listing the images: none was attempted
        printf '%s: 0 captioned, 0 skipped, 0 failed (interrupted before the images were listed)\n' "$PROG" >&2
        printf 'Interrupted: no image attempted yet; run the same command again to resume.\n' >&2
    fi
    exit "$1"
}
trap cleanup EXIT
trap 'on_signal 129' HUP
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

# The work directory is named vision-caption.<host>.<pid>.<8 hex digits>: a run killed with
# kill -9 (no trap runs) leaves it, and a later run removes it when it is this user's, made on
# this host, by a process that is gone (kill -0 fails). A pid in use again keeps it until that
# process ends; another host's (a TMPDIR shared over the network) is never touched. No $(...)
# now that the signal traps are set (see show_into).
work_prefix="${TMPDIR:-/tmp}/vision-caption.${HOSTNAME:-}."
for _dead in "$work_prefix"*; do
    [[ ${_dead#"$work_prefix"} =~ ^([1-9][0-9]*)\.[0-9a-f]{8}$ ]] || continue
    [[ -d $_dead && ! -L $_dead && -O $_dead ]] || continue
    _pid=${BASH_REMATCH[1]}
    if ((_pid == $$)) || kill -0 "$_pid" 2>/dev/null; then continue; fi
    rm -rf -- "$_dead" 2>/dev/null || true
done

# What mktemp -d does (mkdir fails on any existing name); new_dir lets cleanup remove it before
# tmpd is set.
for ((tries = 0; tries < 100; tries++)); do
    if [[ -n ${SRANDOM:-} ]]; then # bash 5.1+
        printf -v new_dir '%s%s.%08x' "$work_prefix" "$$" "$SRANDOM"
    else
        printf -v new_dir '%s%s.%04x%04x' "$work_prefix" "$$" "$RANDOM" "$RANDOM"
    fi
    if (umask 077 && mkdir -- "$new_dir"); then
        tmpd=$new_dir
        break
    fi
    [[ -e $new_dir ]] || break # not a name taken by another run: trying again will not help
    new_dir=""
done
[[ -n $tmpd ]] || die 1 "cannot create a temporary directory"
# Every worker hands its caption and result over through files there: on a full disk each one
# would die without a word ("the worker stopped unexpectedly", image after image). Say it now.
if ! { printf 'probe\n' >"$tmpd/probe"; } 2>/dev/null; then
    die 1 "cannot write in the temporary directory ${TMPDIR:-/tmp} (no space left on its disk?); free some space there, or set TMPDIR to a folder with space"
fi
rm -f -- "$tmpd/probe"
# GNU mv and ln (and busybox's) take -T: a folder made where a caption belongs makes them fail
# rather than put the caption inside it. BSD's (macOS) do not: there, a look after them takes the
# caption back out of such a folder (caption_one).
mv_into_name=() ln_into_name=()
: >"$tmpd/probe"
if mv -T -- "$tmpd/probe" "$tmpd/probe.moved" 2>/dev/null; then mv_into_name=(-T); fi
if ln -T -- "$tmpd/probe.moved" "$tmpd/probe.linked" 2>/dev/null; then ln_into_name=(-T); fi
rm -f -- "$tmpd/probe" "$tmpd/probe.moved" "$tmpd/probe.linked"
# Each vision-client.sh keeps its files (the encoded image among them) in the work directory
# too: a kill -9 of the whole run leaves them there, for the next run to remove with it.
client_cmd=(env "TMPDIR=$tmpd" "${client_cmd[@]}")

# ---------------------------------------------------------------------------------------------
# Check the server before spending time on the folder.

# GET /prompts answers at once on a healthy server: wait at most 30 s (or --timeout) for it.
preflight_timeout=30
if [[ $timeout =~ ^[0-9]+$ ]] && ((timeout < 30)); then preflight_timeout=$timeout; fi

# probe_prompts: GET /prompts once; its exit status is vision-client.sh's, its message in
# $tmpd/preflight.err.
probe_prompts() {
    "${client_cmd[@]}" --timeout "$preflight_timeout" --retries 0 prompts >/dev/null 2>"$tmpd/preflight.err"
}

# not_up_yet: whether the probe's exit 3 is one that waiting can cure, as a server that went
# away mid-run is waited for: nothing listens yet (connection refused), a host that does not
# answer the connection (rebooting), or a proxy answering 502/503 itself (no server behind it
# is up yet). A host name that does not resolve, TLS trouble or a broken reply point at a
# wrong URL and stop the run at once (these are vision-client.sh's messages).
not_up_yet() {
    grep -q -e ': cannot connect to ' -e ': cannot reach the server behind ' "$tmpd/preflight.err"
}

# preflight_message_into VAR: the probe's message, without vision-client.sh's name. (The signal
# traps are set: no $(...), see show_into.)
preflight_message_into() {
    local _line _last=""
    while IFS= read -r _line || [[ -n $_line ]]; do _last=$_line; done <"$tmpd/preflight.err"
    printf -v "$1" '%s' "${_last#"$client_name: "}"
}

# preflight_stop RC REASON: the first request met what every image would meet too: stop the run
# with RC, in the words and with the summary of every early stop (the images are still listed,
# so it says how many were not attempted), as vision-client folder and the .ps1 script do.
preflight_stop() {
    abort_rc=$1
    abort_reason=$2
    say "stopping: $abort_reason"
}

preflight_rc=0
message=""
probe_prompts || preflight_rc=$?
if ((preflight_rc == 3 && wait_for_server > 0)) && not_up_yet; then
    # Started together with the server, or while every server behind HAProxy restarts: wait for
    # it as for an outage mid-run (--wait-for-server), probing with a capped back-off.
    preflight_message_into message
    say "server not answering yet ($message); waiting up to $wait_for_server s for it (--wait-for-server; 0 stops at once)"
    deadline=$((SECONDS + wait_for_server))
    pause=1
    while ((preflight_rc == 3 && SECONDS < deadline)) && not_up_yet; do
        left=$((deadline - SECONDS))
        sleep $((pause < left ? pause : left)) &
        wait "$!" || true
        pause=$((pause * 2 > 5 ? 5 : pause * 2))
        preflight_rc=0
        probe_prompts || preflight_rc=$?
    done
    if ((preflight_rc == 3)) && not_up_yet; then
        preflight_message_into message
        preflight_rc=-1 # handled: the run stops as after an outage mid-run
        preflight_stop 3 "the server cannot be reached (still not after waiting $wait_for_server s: $message)"
    fi
    ((preflight_rc != 0)) || say "server answers; going on"
fi
case $preflight_rc in
0 | -1) ;;
2)
    # vision-client.sh refused an option (the URL): a usage error, before anything started.
    sed "s/^$client_name: /$PROG: /" "$tmpd/preflight.err" >&2
    exit 2
    ;;
3)
    # Cannot connect (--wait-for-server 0), a host name that does not resolve, TLS trouble.
    preflight_message_into message
    preflight_stop 3 "the server cannot be reached ($message)"
    ;;
6)
    preflight_message_into message
    preflight_stop 6 "the server refused the API key ($message)"
    ;;
*)
    preflight_message_into message
    if [[ $message == "HTTP 404"* ]]; then
        # Not a vision-server at this address (a --url with a path?), or a VISION_MODEL it does
        # not serve: every image would fail the same way.
        preflight_stop 2 "${message%.}: check --url (the server's base address, e.g. http://host:54880)${VISION_MODEL:+ and VISION_MODEL}"
    else
        # Busy, slow or broken just now (HTTP 429/503, a timeout, a 500): the images have their
        # own --retries and --timeout, and each failure is reported with its image.
        say "warning: GET /prompts failed ($message); trying anyway"
    fi
    ;;
esac

# ---------------------------------------------------------------------------------------------
# Sweep the temporary captions a killed run left (older than 15 minutes: a younger one may be
# another run's write in progress). The shape of today's names, and the <pid>.<index> names of
# older versions of this script; regular files only, in the folders this run captions: hidden
# folders below it (.git, .cache) are no part of the dataset and are not entered (pruned:
# -delete would imply -depth, which -prune ignores, so rm deletes, one file at a time, and a
# file is counted once rm has deleted it).

hex_glob=""
for _ in {1..16}; do hex_glob+="[0-9a-f]"; done
sweep_args=("$folder" -mindepth 1)
((recursive)) || sweep_args+=(-maxdepth 1)
sweep_args+=(-type d -name '.*' -prune -o)
sweep_args+=(-type f '(' -name ".vision-caption.$hex_glob.tmp" -o -name '.vision-caption.[0-9]*.[0-9]*.tmp' ')')
sweep_args+=(-mmin +15 -exec rm -f -- '{}' ';' -print0)
swept=0
if [[ -z $abort_reason ]]; then # a run that stops before any image writes nothing
    find "${sweep_args[@]}" >"$tmpd/swept" 2>/dev/null || true
else
    : >"$tmpd/swept"
fi
while IFS= read -r -d '' _; do swept=$((swept + 1)); done <"$tmpd/swept"
if ((swept > 0)); then
    say "removed $swept leftover temporary caption file(s) of a killed run"
fi

# ---------------------------------------------------------------------------------------------
# Find the images.

find_args=("$folder")
((recursive)) || find_args+=(-maxdepth 1)
# Every entry named like an image but a folder (a symlink to one is dropped below): a broken
# symlink, a symlink loop or a FIFO is reported as failed with its reason, as the Python tools
# do. A name starting with "." below the folder is no part of the dataset, as in the Python tools
# (captionfiles.is_hidden): such a file is not listed (macOS "._name" files among them), such a
# folder not entered. -mindepth 1 keeps the folder itself out of it: it may be hidden.
find_args+=(-mindepth 1 -name '.*' -prune -o '!' -type d '(')
for e in "${IMAGE_EXTS[@]}"; do
    find_args+=(-iname "*.$e" -o)
done
unset 'find_args[${#find_args[@]}-1]'
find_args+=(')' -print0)

declare -A owner=() # caption path -> the names of the images that claim it, each followed by "/"
# True when caption file $1 holds more than whitespace (and a UTF-8 BOM): an empty or blank file is
# what a failed run leaves, and counts as missing, as in vision-client and vision-server caption.
# One read builtin, no process per file: a resumed run checks thousands of them.
has_text() {
    [[ -s $1 ]] || return 1
    [[ -r $1 ]] || return 0 # cannot read it: leave it alone rather than overwrite it
    local text=
    IFS= read -r -d '' -n 4096 text <"$1" || true
    text=${text#$'\xef\xbb\xbf'}
    [[ -n ${text//[[:space:]]/} ]]
}

# True when the file system of image $1's folder folds case (macOS, Windows, exFAT, a Samba
# share), where b.txt and B.txt are one file: the image's name with its case swapped finds a file
# though no entry of the folder has that name. Asked once per folder, only where two stems differ
# in case alone; as vision-client folder and vision-server caption ask.
folds_case() {
    local dir=${1%/*} swapped=${1##*/} entry
    swapped=${swapped~~}
    [[ -e $dir/$swapped ]] || return 1
    while IFS= read -r -d '' entry; do
        [[ ${entry##*/} == "$swapped" ]] && return 1 # both spellings are files of their own
    done < <(find "$dir" -mindepth 1 -maxdepth 1 -print0 2>/dev/null)
    return 0
}
declare -A spelled=() ask=() folded=() # caption path lower-cased -> as spelled; folders to ask
# Sets key: caption path $1 as its folder's file system compares names (lower-cased where it
# folds case), the key of owner.
claim() {
    key=$1
    if [[ -n ${folded[${1%/*}]+set} ]]; then
        key=${1##*/}
        key=${1%/*}/${key,,}
    fi
}

# file_problem_into VAR IMAGE: why IMAGE cannot be read as an image file (it is no regular file),
# in the words of vision-client folder and vision-server caption (captionfiles.file_problem).
file_problem_into() {
    local _msg="" _target=""
    if [[ -e $2 ]]; then
        printf -v "$1" '%s' "not a regular file" # a FIFO, a socket, a device
        return
    fi
    if [[ ! -L $2 ]]; then
        printf -v "$1" '%s' "no such file" # gone since it was listed
        return
    fi
    { true <"$2"; } 2>"$tmpd/problem" || true # the error of opening it says why (no $(...): see show_into)
    IFS= read -r _msg <"$tmpd/problem" || true
    case $_msg in
    *": No such file or directory")
        readlink -- "$2" >"$tmpd/problem" 2>/dev/null || true
        IFS= read -r -d '' _target <"$tmpd/problem" || true
        printable_into _target "${_target%$'\n'}"
        printf -v "$1" 'broken symlink (points to %s)' "$_target"
        ;;
    *": Too many levels of symbolic links") printf -v "$1" '%s' "symlink loop" ;;
    *": Permission denied") printf -v "$1" '%s' "permission denied" ;;
    *": "*) printf -v "$1" '%s' "${_msg##*: }" ;;
    *) printf -v "$1" '%s' "cannot open it" ;;
    esac
}

# name_too_long_into VAR CAPTION: when no file named CAPTION can exist because its name is longer
# than the file system allows (an image name near 255 bytes, or a long <ext>), the reason, in the
# words of the Python tools (captionfiles.caption_target_problem), so the image fails before it is
# sent instead of at the rename; else VAR is empty. Only names of more than 64 bytes are tried (no
# file system in use allows fewer); the file system is asked, by opening the name.
name_too_long_into() {
    local LC_ALL=C # ${#name} counts bytes
    local _name=${2##*/} _msg=""
    printf -v "$1" '%s' ""
    ((${#_name} > 64)) || return 0
    [[ -e $2 || -L $2 ]] && return 0
    { true <"$2"; } 2>"$tmpd/problem" || true
    IFS= read -r _msg <"$tmpd/problem" || true
    if [[ $_msg == *": File name too long" ]]; then
        printf -v "$1" 'the name of its caption file (%d bytes) is too long for the file system; rename the image to a shorter name' "${#_name}"
    fi
}

# not_a_caption_file_into VAR CAPTION: when a folder, pipe, socket or device stands where the
# caption file CAPTION belongs, the reason, in the words of the Python tools
# (captionfiles.caption_target_problem): no mode may skip it (-s is true for a folder), mv into
# it, replace it (a pipe) or read it (a pipe would hang the run); else VAR is empty. Said when
# the run plans the image, and again by its worker (caption_one) up to the rename.
not_a_caption_file_into() {
    local _what=""
    if [[ -d $2 ]]; then
        _what="is a directory, not a caption file"
    elif [[ -e $2 && ! -f $2 ]]; then
        _what="is not a regular file (a pipe, socket or device), not a caption file"
    fi
    printf -v "$1" '%s' ""
    [[ -n $_what ]] || return 0
    printable_into "$1" "${2##*/}"
    printf -v "$1" '%s %s' "${!1}" "$_what"
}

declare -a found=()
while IFS= read -r -d '' img; do
    [[ -d $img ]] && continue # a symlink to a folder: not entered, and no image
    found+=("$img")
    cap=${img%.*}.$ext
    if [[ -z ${spelled[${cap,,}]+set} ]]; then
        spelled[${cap,,}]=$cap
    elif [[ ${spelled[${cap,,}]} != "$cap" ]]; then # b.jpg and B.png: one b.txt on some disks
        ask[${img%/*}]=$img
    fi
done < <(find "${find_args[@]}" | LC_ALL=C sort -z)
total_found=${#found[@]}
for dir in ${ask[@]+"${!ask[@]}"}; do
    if folds_case "${ask[$dir]}"; then folded[$dir]=1; fi
done
for img in ${found[@]+"${found[@]}"}; do
    claim "${img%.*}.$ext"
    owner[$key]+=${img##*/}/ # "/" never occurs in a file name: a safe separator
done
unset spelled ask

for img in ${found[@]+"${found[@]}"}; do # (bash < 4.4 calls an empty array unbound)
    cap=${img%.*}.$ext
    if [[ ! -f $img ]]; then # a broken symlink, a symlink loop, a FIFO: never opened nor sent
        file_problem_into problem "$img"
        failed+=("$img"$'\t'"$problem")
        continue
    fi
    # Images with the same stem (a.jpg, a.png; b.jpg, B.png where the folder folds case) share one
    # caption file, which a trainer would pair with both: none of them is captioned, even when the
    # caption file exists (as in vision-client folder and vision-server caption).
    claim "$cap"
    names=${owner[$key]}
    if [[ $names != "${img##*/}/" ]]; then
        others=""
        n_others=0
        while [[ -n $names ]]; do
            name=${names%%/*}
            names=${names#*/}
            [[ $name == "${img##*/}" ]] && continue
            printable_into name "$name"
            others+=${others:+, }$name
            n_others=$((n_others + 1))
        done
        printable_into shown_cap "${cap##*/}"
        if ((n_others == 1)); then
            failed+=("$img"$'\t'"shares its caption file $shown_cap with $others; neither is captioned, rename one of them")
        else
            failed+=("$img"$'\t'"shares its caption file $shown_cap with $others; none is captioned, rename all but one")
        fi
        continue
    fi
    name_too_long_into problem "$cap"
    if [[ -n $problem ]]; then
        failed+=("$img"$'\t'"$problem")
        continue
    fi
    not_a_caption_file_into problem "$cap"
    if [[ -n $problem ]]; then
        failed+=("$img"$'\t'"$problem")
        continue
    fi
    if [[ $mode == skip ]] && has_text "$cap"; then
        skipped=$((skipped + 1))
        continue
    fi
    todo+=("$img")
    todo_cap+=("$cap")
done
unset owner found folded

total=${#todo[@]}

# ---------------------------------------------------------------------------------------------
# Output helpers

# The helpers the main loop calls for every image store their text in a variable (printf -v)
# instead of printing it for a $(...): bash 5.2 can hang, or fail with "unexpected EOF while
# looking for matching `)'", when Ctrl+C reaches it while it waits for a command substitution,
# and the summary of an interrupted run must still come.

# show_into VAR PATH: the path relative to the folder, with control characters and bytes that are
# not UTF-8 made visible (printable_into). (The *_into helpers' locals start with "_", so that a
# caller's VAR is never one of them.)
show_into() {
    printable_into "$1" "${2#"$folder"/}"
}

# last_line_into VAR FILE: the last line of FILE (tail -n 1).
last_line_into() {
    local _line _last=""
    while IFS= read -r _line || [[ -n $_line ]]; do _last=$_line; done <"$2"
    printf -v "$1" '%s' "$_last"
}

# show PATH: show_into for a $(...), where no signal is expected (the summary, printed with the
# signals ignored).
show() {
    local p
    show_into p "$1"
    printf '%s' "$p"
}

# now_us_into VAR: the time in microseconds.
now_us_into() {
    local _t=${EPOCHREALTIME:-}
    if [[ -n $_t ]]; then
        _t=${_t//[.,]/}
        printf -v "$1" '%s' "$((10#$_t))"
    else
        printf -v _t '%(%s)T' -1
        printf -v "$1" '%s' "$((_t * 1000000))"
    fi
}

# fmt_duration_into VAR SECONDS: "m:ss" or "h:mm:ss".
fmt_duration_into() {
    local _s=$2
    if ((_s >= 3600)); then
        printf -v "$1" '%d:%02d:%02d' $((_s / 3600)) $((_s % 3600 / 60)) $((_s % 60))
    else
        printf -v "$1" '%d:%02d' $((_s / 60)) $((_s % 60))
    fi
}

now_us_into start_us

# rate_eta_into VAR: "2.5 img/s, ETA 1:02" for the images finished so far.
rate_eta_into() {
    local _done=$((n_ok + n_meanwhile + n_failed + n_aborted)) _now _elapsed _rate10 _eta
    now_us_into _now
    _elapsed=$((_now - start_us))
    ((_elapsed > 0)) || _elapsed=1
    _rate10=$((_done * 10000000 / _elapsed))
    if ((_done > 0)); then
        fmt_duration_into _eta $(((total - _done) * _elapsed / _done / 1000000))
        printf -v "$1" '%d.%d img/s, ETA %s' $((_rate10 / 10)) $((_rate10 % 10)) "$_eta"
    else
        printf -v "$1" '0.0 img/s, ETA ?'
    fi
}

tty_progress=0
if [[ -t 2 ]] && ((!quiet)); then tty_progress=1; fi

progress_line() {
    ((tty_progress)) || return 0
    local extra="" rate
    ((n_failed == 0)) || extra=", $n_failed failed"
    rate_eta_into rate
    printf '\r\033[K[%d/%d] %s%s' $((n_ok + n_meanwhile + n_failed + n_aborted)) "$total" "$rate" "$extra" >&2
}

# note_result STATUS IMAGE [REASON]: print one finished image.
note_result() {
    local status=$1 img=$2 reason=${3:-} count shown rate
    count="[$((n_ok + n_meanwhile + n_failed + n_aborted))/$total]"
    show_into shown "$img"
    if [[ $status == skipped ]]; then
        if ((!tty_progress && !quiet)); then
            rate_eta_into rate
            printf '%s skipped %s: %s (%s)\n' "$count" "$shown" "$reason" "$rate" >&2
        fi
        progress_line
    elif ((tty_progress)); then
        if [[ $status != ok ]]; then
            printf '\r\033[KFAILED %s: %s\n' "$shown" "$reason" >&2
        fi
        progress_line
    elif [[ $status != ok ]]; then
        rate_eta_into rate
        printf '%s FAILED %s: %s (%s)\n' "$count" "$shown" "$reason" "$rate" >&2
    elif ((!quiet)); then
        rate_eta_into rate
        printf '%s ok %s (%s)\n' "$count" "$shown" "$rate" >&2
    fi
}

report() {
    local elapsed now took line not_started=$((total - next + n_aborted + ${#retry_q[@]}))
    elapsed=0
    if ((start_us > 0)); then
        now_us_into now
        elapsed=$(((now - start_us) / 1000000))
    fi
    fmt_duration_into took "$elapsed"
    if ((tty_progress)); then printf '\r\033[K' >&2; fi
    {
        printf '%s: %d image(s) found: %d captioned, %d skipped (caption exists), %d failed' \
            "$PROG" "$total_found" "$n_ok" "$skipped" "${#failed[@]}"
        if ((interrupted > 0)); then printf ', %d interrupted' "$interrupted"; fi
        if ((not_started > 0)); then printf ', %d not attempted' "$not_started"; fi
        printf ', in %s\n' "$took"
        if ((${#failed[@]})); then
            printf 'Failed images (no caption file was written for them):\n'
            for line in "${failed[@]}"; do
                printf '  %s: %s\n' "$(show "${line%%$'\t'*}")" "${line#*$'\t'}"
            done
        fi
        if [[ -n $abort_reason ]]; then # the words of every folder captioner
            printf 'Stopped early, %d image(s) not attempted: %s\n' "$not_started" "$abort_reason"
        fi
        if ((interrupted >= 0)); then
            printf 'Interrupted: %d image(s) not captioned yet (the ones in flight were dropped; nothing is half-written); run the same command again to resume.\n' \
                $((interrupted + not_started))
        fi
    } >&2
}

# The first request already stopped the run: the summary, with every image to caption not
# attempted, and the exit status of the cause.
if [[ -n $abort_reason ]]; then
    report
    exit "$abort_rc"
fi

# file_mode_into VAR FILE SCRATCH: FILE's permission bits in octal (640), or empty when stat
# cannot tell; GNU stat first, then BSD/macOS stat (neither follows a symlink). SCRATCH takes
# stat's answer (no $(...): see show_into).
file_mode_into() {
    local _mode=""
    if stat -c %a -- "$2" >"$3" 2>/dev/null || stat -f %Mp%Lp -- "$2" >"$3" 2>/dev/null; then
        IFS= read -r _mode <"$3" || true
    fi
    [[ $_mode =~ ^[0-7]{3,4}$ ]] || _mode=""
    printf -v "$1" '%s' "$_mode"
}

# ---------------------------------------------------------------------------------------------
# One image, in a background subshell. Leaves "$tmpd/res.INDEX" (ok / fail / abort RC, then
# the reason) and writes INDEX to the completion pipe.

caption_one() {
    set +e
    local idx=$1 img=${todo[$1]} cap=${todo_cap[$1]} tmp rc caption content old line reason dir perm shown
    local out=$tmpd/out.$1 err=$tmpd/err.$1 res=$tmpd/res.$1 child="" renaming=0 linking=0
    tmp=${todo_cap[idx]%/*}/.vision-caption.${temp_ids[idx]}.tmp # temp_caption, without a subshell
    # A worker is stopped by the main script (TERM) or by a signal to the whole process group,
    # Ctrl+C included (INT: background shells see it although their commands ignore it). It stops
    # its vision-client.sh, which removes its own temporary files, and its caption temp file.
    # shellcheck disable=SC2317,SC2329  # called by the trap
    on_term() {
        local pids IFS=$' \t\n'
        trap '' HUP INT TERM
        pids=$(jobs -p)
        # shellcheck disable=SC2086  # one pid per word
        if [[ -n $child$pids ]]; then kill -TERM $child $pids 2>/dev/null; fi
        wait 2>/dev/null
        # Stopped right after renaming its caption into place (the rename is atomic: the
        # temporary file is gone only once it happened): that caption is complete, so say so,
        # and the summary counts it as the main script collects the results it finds.
        # So is one hard-linked into place (skip mode): the caption file is then the temporary
        # file itself (-ef: the same file), or the temporary name is already gone (the signal
        # came after the rm that follows a link made: ln failing resets linking first).
        if { { ((renaming)) && [[ ! -e $tmp ]]; } || { ((linking)) && { [[ $tmp -ef $cap ]] || [[ ! -e $tmp ]]; }; }; } && [[ ! -e $res ]]; then
            printf '%s\n' ok 0 "" >"$res"
        fi
        rm -f -- "$tmp"
        exit 143
    }
    trap on_term HUP INT TERM

    finish() {
        printf '%s\n' "$@" >"$res.part" && mv -f -- "$res.part" "$res"
        printf '%s\n' "$idx" >&"$done_fd"
        exit 0
    }

    # Said here, in the words every folder captioner uses (the summary names the image before it).
    if [[ -f $img && ! -s $img ]]; then finish fail 2 "the file is empty (0 bytes)"; fi
    # The run was planned at its start, maybe hours ago: a caption file written since (another
    # run over the folder, a caption saved in the gallery) stays, and the image is not sent.
    if [[ $mode == skip ]] && has_text "$cap"; then finish skipped 0 "$WRITTEN_MEANWHILE"; fi

    "${client_cmd[@]}" --retries "$retries" --no-newline -- "$prompt" "$img" >"$out" 2>"$err" &
    child=$!
    wait "$child"
    rc=$?
    child=""

    if ((rc > 128)); then
        # vision-client.sh was stopped by a signal (its trap exits 128 + the signal's number):
        # nothing is wrong with the image, so this is no failure. Most often Ctrl+C or a TERM to
        # the whole run, whose trap in this shell comes at once; the main script counts the image
        # as not captioned yet, or sends it again when the run goes on.
        finish stopped "$rc" "vision-client.sh was stopped by a signal (exit status $rc)"
    fi
    if ((rc != 0)); then
        reason=""
        while IFS= read -r line || [[ -n $line ]]; do
            [[ -n $line ]] && reason=$line
        done <"$err"
        reason=${reason#"$client_name: "}
        [[ -n $reason ]] || reason="vision-client.sh exit status $rc"
        case $rc in
        3 | 5 | 6 | 7) finish abort "$rc" "$reason" ;;
        esac
        # A 404: the server (restarted?) no longer serves VISION_MODEL, or is not a vision-server
        # any more; every image left would get the same, so it stops the run as it does at the
        # start (exit status 2).
        if ((rc == 1)) && [[ $reason == "HTTP 404: "* ]]; then finish abort 2 "$reason"; fi
        finish fail "$rc" "$reason"
    fi

    caption=""
    IFS= read -r -d '' caption <"$out" || true # no $(<...): see show_into
    caption=${caption//$'\r\n'/ }
    caption=${caption//[$'\r\n']/ }
    [[ -n ${caption//[[:space:]]/} ]] || finish fail 1 "the server returned an empty caption"
    content=$prefix$caption$suffix

    if [[ $mode == append || $mode == prepend ]] && [[ -s $cap ]]; then
        old=""
        { IFS= read -r -d '' old || true; } <"$cap" || finish fail 1 "cannot read the existing caption file"
        # As the Python tools read it (merge_caption): no UTF-8 BOM, no white space around it.
        old=${old#$'\xef\xbb\xbf'}
        old=${old%"${old##*[![:space:]]}"}
        old=${old#"${old%%[![:space:]]*}"}
        if [[ -n $old ]]; then
            if [[ $mode == append ]]; then content=$old$separator$content; else content=$content$separator$old; fi
        fi
    fi

    # stop_if_disk_full MESSAGE: a full disk (or quota, or size limit) stops the run, whether the
    # write or the rename met it (a folder that must grow for the caption's name): every image
    # after this one would fail the same way. MESSAGE is a C error message: a full disk is told
    # apart by its words. Said in the words of vision-client folder and vision-server caption,
    # the whole path (which disk is full) on one line: the result file is read line by line.
    stop_if_disk_full() {
        local where
        show_into shown "$folder"
        show_into where "$cap"
        where=$shown/$where
        case $1 in
        *"No space left on device"*) finish abort 1 "cannot write $where: no space left on the device" ;;
        *"Disk quota exceeded"*) finish abort 1 "cannot write $where: disk quota exceeded: no space left for this user" ;;
        *"File too large"*) finish abort 1 "cannot write $where: file too large: no space left within the size limit" ;;
        esac
    }

    # A folder, pipe, socket or device made where the caption file belongs since the run planned
    # the image is no caption (has_text never counts it) and is not replaced (mv would replace a
    # pipe, and move the caption into a folder, saying ok): the image fails in the planning's
    # words, as in vision-client folder and vision-server caption, in every mode. Looked at
    # before the write, and again when ln or mv fails or leaves the caption inside a folder: one
    # made between the look and the rename.
    refuse_no_caption_file() {
        not_a_caption_file_into reason "$cap"
        [[ -n $reason ]] || return 0
        renaming=0 linking=0 # not in place: a stop now must not count it captioned
        rm -f -- "$tmp"
        if [[ -d $cap ]]; then rm -f -- "$cap/${tmp##*/}"; fi # BSD mv and ln put it inside: ours, by its name
        finish fail 1 "$reason"
    }
    refuse_no_caption_file

    # Write beside the image, then rename: the caption file is either complete or untouched.
    # Flushed to the disk where sync takes a file.
    if ! { (LC_ALL=C && set -o noclobber && printf '%s' "$content" >"$tmp") && { ((!sync_files)) || LC_ALL=C sync -- "$tmp"; }; } 2>"$err"; then
        rm -f -- "$tmp"
        last_line_into line "$err"
        stop_if_disk_full "$line"
        show_into dir "${cap%/*}"
        finish fail 1 "cannot write in $dir: $line"
    fi
    if [[ $mode == skip ]]; then
        # One saved while the server captioned the image stays too. A hard link publishes the
        # caption only where no file is (ln refuses an existing name), so not even one saved
        # between this look and the write is replaced; without hard links (FAT, some shares) or
        # over an empty file, a last look and the rename below.
        if has_text "$cap"; then
            rm -f -- "$tmp"
            finish skipped 0 "$WRITTEN_MEANWHILE"
        fi
        linking=1
        if [[ ! -e $cap && ! -L $cap ]] && ln ${ln_into_name[@]+"${ln_into_name[@]}"} -- "$tmp" "$cap" 2>/dev/null; then
            refuse_no_caption_file
            rm -f -- "$tmp"
            finish ok 0 ""
        fi
        linking=0
        refuse_no_caption_file
        if has_text "$cap"; then
            rm -f -- "$tmp"
            finish skipped 0 "$WRITTEN_MEANWHILE"
        fi
    fi
    # The rules of every folder captioner (captionfiles.write_atomic): a caption file the user
    # made read-only is kept, a rewritten one keeps its mode, and a symlinked one is replaced by
    # a plain file of a new file's mode (mv renames over the link; its target is never written).
    if [[ -f $cap && ! -L $cap ]]; then
        file_mode_into perm "$cap" "$err"
        # Root may write any file ([[ -w ]] says yes): the mode bits say whether the user wants it kept.
        if [[ ! -w $cap ]] || { [[ -n $perm ]] && (((8#$perm & 8#222) == 0)); }; then
            rm -f -- "$tmp"
            show_into dir "${cap##*/}"
            finish fail 1 "$dir is read-only; make it writable (chmod u+w) to let it be replaced"
        fi
        if [[ -n $perm ]] && ! chmod -- "$perm" "$tmp" 2>"$err"; then
            rm -f -- "$tmp"
            last_line_into line "$err"
            finish fail 1 "cannot keep the mode of the caption file: $line"
        fi
    fi
    renaming=1
    if ! LC_ALL=C mv -f ${mv_into_name[@]+"${mv_into_name[@]}"} -- "$tmp" "$cap" 2>"$err"; then
        renaming=0
        refuse_no_caption_file
        rm -f -- "$tmp"
        last_line_into line "$err"
        stop_if_disk_full "$line"
        finish fail 1 "cannot create the caption file: $line"
    fi
    refuse_no_caption_file
    finish ok 0 ""
}

# ---------------------------------------------------------------------------------------------
# The worker pool: up to $jobs images in flight; each finished worker writes its index into a
# FIFO that the main loop reads (with a timeout, to refresh the ETA and notice dead workers).

if ((quiet == 0)); then
    show_into shown "$folder"
    say "$total_found image(s) found in $shown, $skipped already captioned, $total to caption ($jobs at a time)"
fi

mkfifo "$tmpd/done" || die 1 "cannot create a FIFO in $tmpd"
exec {done_fd}<>"$tmpd/done"

# collect INDEX: account for the finished worker INDEX. A signal meanwhile is handled after it,
# so an image is never half counted (out of "running" but not yet among the results).
collect() {
    collecting=1
    # "|| true" keeps set -e out of it: the signal also stops its rm, whose failure must not end
    # the script before the deferred signal is handled.
    account "$1" || true
    collecting=0
    if ((deferred_signal)); then on_signal "$deferred_signal"; fi
}

account() {
    local idx=$1 status rc reason img=${todo[$1]} pid=${running[$1]}
    unset 'running[$idx]'
    if [[ -f $tmpd/res.$idx ]]; then
        {
            IFS= read -r status
            IFS= read -r rc
            IFS= read -r reason
        } <"$tmpd/res.$idx"
    else
        # A worker gone without a result (only looked for once it is gone): its exit status says
        # whether a signal stopped it (its trap exits 143), as Ctrl+C to the whole run does
        # before this shell's own trap has run, or it broke.
        rc=0
        wait "$pid" 2>/dev/null || rc=$?
        if ((rc > 128)); then
            status=stopped reason="the worker was stopped by a signal (exit status $rc)"
        else
            status=fail rc=1 reason="the worker stopped unexpectedly"
        fi
        # Remove its temp_caption, which it may have left (no $(...): see show_into).
        rm -f -- "${todo_cap[idx]%/*}/.vision-caption.${temp_ids[idx]}.tmp"
    fi
    rm -f -- "$tmpd/res.$idx" "$tmpd/out.$idx" "$tmpd/err.$idx"
    if [[ $status == ok ]]; then
        n_ok=$((n_ok + 1))
        note_result ok "$img"
        return
    fi
    if [[ $status == skipped ]]; then # its caption file was written meanwhile
        skipped=$((skipped + 1))
        n_meanwhile=$((n_meanwhile + 1))
        note_result skipped "$img" "$reason"
        return
    fi
    if [[ $status == stopped ]]; then
        # Not the image's fault: Ctrl+C (this shell's trap, pending, counts it as not captioned
        # yet), or a signal to this one request, which is sent again once.
        local stops=$((${stop_hits[$idx]:-0} + 1))
        if ((stops <= 1)); then
            stop_hits[$idx]=$stops
            retry_q+=("$idx")
            return
        fi
        status=fail
        reason="stopped by a signal twice: $reason"
    fi
    if [[ $status == abort && $rc == 3 ]] && ((wait_for_server > 0)); then
        # The server went away (a restart?): no caption was written, so send this image again
        # once it answers; the main loop stops starting images and waits for it.
        local hits=$((${outage_hits[$idx]:-0} + 1))
        if ((hits <= max_outage_hits)); then
            outage_hits[$idx]=$hits
            retry_q+=("$idx")
            outage=1
            progress_line
            return
        fi
        status=fail
        reason="the connection broke $hits times around this image (does the server crash on it?): $reason"
    fi
    if [[ $status == abort ]]; then
        # A problem of the whole run, not of this image: stop, and report it once.
        n_aborted=$((n_aborted + 1))
        if [[ -z $abort_reason ]]; then
            abort_rc=$rc
            case $rc in
            1) abort_reason="$reason; free some space, then run the same command again: it resumes where this run stopped" ;;
            2) abort_reason="${reason%.}: check --url (the server's base address)${VISION_MODEL:+ and VISION_MODEL}" ;;
            3) abort_reason="the server cannot be reached ($reason)" ;;
            5) abort_reason="the server stays busy or unavailable ($reason)" ;;
            6) abort_reason="the server refused the API key ($reason)" ;;
            *) abort_reason="the server refused the prompt ($reason)" ;;
            esac
            if ((tty_progress)); then printf '\r\033[K' >&2; fi
            say "stopping: $abort_reason"
        fi
        progress_line
        return
    fi
    n_failed=$((n_failed + 1))
    failed+=("$img"$'\t'"$reason")
    note_result fail "$img" "$reason"
}

# nap SECONDS: sleep in the background, so a signal is handled at once.
nap() {
    sleep "$1" &
    wait "$!" || true
}

# server_answers: whether the server answers GET /prompts now: any answer within 10 s counts,
# but not a proxy's own 502/503 (vision-client.sh exits 3 for those: no server behind it yet).
server_answers() {
    local rc=0
    "${client_cmd[@]}" --timeout 10 --retries 0 prompts >/dev/null 2>"$tmpd/probe.err" || rc=$?
    ((rc != 3 && rc != 4))
}

# wait_for_server_back: after an outage, probe until the server answers or --wait-for-server
# runs out (then stop the run the way an unreachable server always did).
wait_for_server_back() {
    local deadline pause=1 left
    outage=0
    server_answers && return 0 # a blip: go on quietly
    if ((tty_progress)); then printf '\r\033[K' >&2; fi
    say "server unreachable; waiting up to $wait_for_server s for it to come back"
    deadline=$((SECONDS + wait_for_server))
    while ((SECONDS < deadline)); do
        left=$((deadline - SECONDS))
        nap $((pause < left ? pause : left))
        pause=$((pause * 2 > 5 ? 5 : pause * 2))
        if server_answers; then
            say "server back; going on"
            progress_line
            return 0
        fi
    done
    local last
    last_line_into last "$tmpd/probe.err"
    abort_rc=3
    abort_reason="the server cannot be reached (still not after waiting $wait_for_server s: ${last#"$client_name: "})"
    say "stopping: $abort_reason"
}

progress_line
partial=""
while :; do
    while [[ -z $abort_reason ]] && ((!outage && (${#retry_q[@]} || next < total) && ${#running[@]} < jobs)); do
        if ((${#retry_q[@]})); then
            idx=${retry_q[0]}
            retry_q=("${retry_q[@]:1}")
        else
            idx=$next
            next=$((next + 1))
        fi
        [[ -n ${temp_ids[$idx]:-} ]] || new_temp_id "$idx"
        caption_one "$idx" &
        running[$idx]=$!
    done
    if ((${#running[@]} == 0)); then
        # Every request in flight has come back: with the server gone, wait for it here.
        if ((outage)) && [[ -z $abort_reason ]]; then
            wait_for_server_back
            continue
        fi
        break
    fi
    if IFS= read -r -t 1 -u "$done_fd" line; then
        idx=$partial$line
        partial=""
        if [[ $idx =~ ^[0-9]+$ && -n ${running[$idx]+set} ]]; then collect "$idx"; fi
    else
        # A timeout can strike in the middle of a line on a loaded machine: read keeps what it
        # got, and the rest of that index comes with the next read.
        partial+=$line
        # No news for a second: refresh the ETA and look for workers that died silently.
        for idx in "${!running[@]}"; do
            if ! kill -0 "${running[$idx]}" 2>/dev/null; then
                collect "$idx"
            fi
        done
        progress_line
    fi
done

report
if ((abort_rc != 0)); then exit "$abort_rc"; fi
((${#failed[@]} == 0)) || exit 1
exit 0
