#!/usr/bin/env bash
# vision-client.sh: caption one image with a vision-server (or a florence2-visionapi server).
# Run with --help for usage. Needs bash >= 4, curl, base64, and jq or python3.
set -euo pipefail

PROG=${0##*/}
DEFAULT_URL=http://127.0.0.1:54880

# Exit codes (also used by vision-caption-folder-images.sh).
readonly EXIT_ERROR=1 EXIT_USAGE=2 EXIT_CONNECT=3 EXIT_TIMEOUT=4 EXIT_BUSY=5 EXIT_AUTH=6 EXIT_PROMPT=7

# The retry schedule of every client (docs/clients/index.md#retries; the folder script retries
# through this one), in milliseconds as bash counts in whole numbers: the server's Retry-After,
# at most RETRY_AFTER_MAX_S, plus up to a tenth more; without one RETRY_BASE_MS, doubling each
# time up to RETRY_MAX_MS, each wait somewhere between half of that and all of it.
readonly RETRIES_DEFAULT=5 RETRY_BASE_MS=500 RETRY_MAX_MS=30000 RETRY_AFTER_MAX_S=120

usage() {
    cat <<EOF
Usage:
  $PROG [options] <PROMPT> <image>   caption an image (use - as <image> to read it from stdin)
  $PROG [options] prompts            list the prompts (tasks) the model accepts, as JSON
  $PROG [options] model              print the name of the model the server runs
  $PROG [options] status             print the server's status (GET /v1/status) as JSON

PROMPT is a task such as CAPTION, DETAILED_CAPTION, MORE_DETAILED_CAPTION, GENERATE_TAGS,
ANALYZE, MIXED_CAPTION or MIXED_CAPTION_PLUS, in any case, with or without the angle
brackets: CAPTION, caption and <CAPTION> are the same. "$PROG prompts" lists them.

On success only the caption is printed on stdout (leading and trailing whitespace removed,
followed by one newline unless -n is given). Errors go to stderr with the server's message.

Options:
  --url URL        server address (default: \$VISION_HOST, else $DEFAULT_URL);
                   "host:port" without a scheme means http://host:port
  --timeout SEC    give up after SEC seconds for the whole request (default: \$VISION_TIMEOUT,
                   else 300); the connection itself must open within 10 s
  --model NAME     caption with NAME, one of the server's models (default: \$VISION_MODEL, else
                   the server's default model); "prompts" then lists NAME's tasks
  --retries N      retry up to N times when the server answers 429, 502 or 503 (busy),
                   waiting for its Retry-After (at most 120 s) or 0.5, 1, 2, 4... s (at most
                   30 s), each with a little jitter (default: 5, as every client)
  -n, --no-newline do not print a newline after the caption
  -h, --help       show this help and exit

Environment:
  VISION_HOST      server URL, e.g. http://gpu-box:54880 (overridden by --url)
  VISION_API_KEY   API key, sent as "Authorization: Bearer <key>" (never on a command line)
  VISION_TIMEOUT   default for --timeout
  VISION_MODEL     default for --model (vision-caption-folder-images.sh passes it on)
  VISION_PRIORITY  interactive or bulk, sent as "X-Priority" (the server's default: interactive;
                   vision-caption-folder-images.sh sets bulk)
  VISION_CLIENT_ID a name sent as "X-Client-Id": bulk clients on one address take turns by it

The image is base64-encoded into a temporary file and streamed to the server, so images of
any size work (the server may still refuse very large ones with HTTP 413). Temporary files
are removed on every exit, including Ctrl+C; those of a run killed with kill -9 (in
\${TMPDIR:-/tmp}/vision-client.<host>.<pid>.<hex>) are removed by the next run.

Exit status:
  0 success
  1 the server answered with an error, or with something unexpected; or a temporary file
    cannot be written (TMPDIR's disk is full)
  2 usage error, or the image file cannot be read
  3 cannot connect to the server (refused, the connection broke, or it did not open within
    10 s: a host that is down), or a proxy in front of it answers 502/503 without Retry-After
    or JSON (no server behind it is up), even after --retries
  4 timed out (no answer within --timeout, or HTTP 504 from the server)
  5 the server is busy (HTTP 429/502/503), even after --retries
  6 authentication failed (HTTP 401/403): check VISION_API_KEY
  7 the server rejected the prompt

Examples:
  $PROG CAPTION photo.jpg
  $PROG --url http://gpu-box:54880 '<MORE_DETAILED_CAPTION>' photo.png > photo.txt
  VISION_API_KEY=secret $PROG generate_tags - < photo.webp
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
    exit "$EXIT_USAGE"
}

if ((BASH_VERSINFO[0] < 4)); then
    die "$EXIT_USAGE" "needs bash 4 or newer (this is bash $BASH_VERSION)"
fi

# ---------------------------------------------------------------------------------------------
# Arguments

url=${VISION_HOST:-$DEFAULT_URL}
timeout=${VISION_TIMEOUT:-300}
model=${VISION_MODEL:-}
retries=$RETRIES_DEFAULT
newline=1
args=()

need_value() {
    (($2 >= 2)) || usage_error "option $1 needs a value"
}

while (($#)); do
    case $1 in
    -h | --help)
        usage
        exit 0
        ;;
    --url | --timeout | --retries | --model)
        need_value "$1" $#
        case $1 in
        --url) url=$2 ;;
        --timeout) timeout=$2 ;;
        --retries) retries=$2 ;;
        --model) model=$2 ;;
        esac
        shift 2
        ;;
    --url=*) url=${1#*=} && shift ;;
    --model=*) model=${1#*=} && shift ;;
    --timeout=*) timeout=${1#*=} && shift ;;
    --retries=*) retries=${1#*=} && shift ;;
    -n | --no-newline) newline=0 && shift ;;
    --)
        shift
        args+=("$@")
        break
        ;;
    -?*) usage_error "unknown option: $1" ;;
    *) args+=("$1") && shift ;;
    esac
done

[[ $timeout =~ ^[0-9]+([.][0-9]+)?$ && ! $timeout =~ ^0+([.]0*)?$ ]] ||
    usage_error "--timeout must be a positive number of seconds, not '$timeout'"
[[ $retries =~ ^[0-9]+$ ]] || usage_error "--retries must be a whole number, not '$retries'"
[[ -n $url ]] || usage_error "the server URL is empty"
[[ $url =~ ^[A-Za-z][A-Za-z0-9+.-]*:// ]] || url=http://$url
while [[ $url == */ ]]; do url=${url%/}; done

# The connection must open quickly even when the whole request may take long.
connect_timeout=10
if [[ $timeout =~ ^[0-9]+$ ]] && ((timeout < connect_timeout)); then connect_timeout=$timeout; fi

# ---------------------------------------------------------------------------------------------
# JSON helpers: jq when present, python3 otherwise.

if command -v jq >/dev/null 2>&1; then
    json_tool=jq
elif command -v python3 >/dev/null 2>&1; then
    json_tool=python3
else
    die "$EXIT_USAGE" "needs jq or python3 to read the server's JSON; install one of them"
fi

# json_quote STRING: print STRING as a JSON string literal.
json_quote() {
    if [[ $json_tool == jq ]]; then
        jq -nj --arg s "$1" '$s | tojson'
    else
        python3 -c 'import json, sys; sys.stdout.write(json.dumps(sys.argv[1]))' "$1"
    fi
}

# json_field FILE KEY: print the string value of KEY in the JSON object in FILE (other JSON
# values are printed as compact JSON); fail when FILE is not such an object.
json_field() {
    if [[ $json_tool == jq ]]; then
        jq -j --arg k "$2" \
            'if type == "object" and has($k) then (.[$k] | if type == "string" then . else tojson end)
             else error("no \($k)") end' "$1" 2>/dev/null
    else
        python3 - "$1" "$2" 2>/dev/null <<'PY'
import json, sys
with open(sys.argv[1], encoding="utf-8") as f:
    doc = json.load(f)
value = doc[sys.argv[2]]  # KeyError/TypeError: not the object we want
if not isinstance(value, str):
    value = json.dumps(value, separators=(",", ":"))
sys.stdout.write(value)
PY
    fi
}

# json_text FILE: a JSON string as plain text, any other JSON value as compact JSON.
json_text() {
    if [[ $json_tool == jq ]]; then
        jq -j 'if type == "string" then . else tojson end' "$1" 2>/dev/null
    else
        python3 - "$1" 2>/dev/null <<'PY'
import json, sys
with open(sys.argv[1], encoding="utf-8") as f:
    doc = json.load(f)
sys.stdout.write(doc if isinstance(doc, str) else json.dumps(doc, separators=(",", ":")))
PY
    fi
}

# json_pretty FILE: indented JSON.
json_pretty() {
    if [[ $json_tool == jq ]]; then
        jq . "$1" 2>/dev/null
    else
        python3 - "$1" 2>/dev/null <<'PY'
import json, sys
with open(sys.argv[1], encoding="utf-8") as f:
    doc = json.load(f)
print(json.dumps(doc, indent=2, ensure_ascii=False))
PY
    fi
}

# The signal traps below stay set for the rest of the script, which uses no $(...): bash 5.2
# can hang, or fail with "unexpected EOF while looking for matching `)'", when the signal lands
# inside one. Helpers store their result in a variable (printf -v) instead, or `into` runs a
# command with its output in a file that it reads back. (The *_into helpers' locals start with "_", so that a caller's
# VAR is never one of them.)

# trim_into VAR TEXT: TEXT without leading and trailing whitespace.
trim_into() {
    local _s=$2
    _s=${_s#"${_s%%[![:space:]]*}"}
    _s=${_s%"${_s##*[![:space:]]}"}
    printf -v "$1" '%s' "$_s"
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

# into VAR COMMAND [ARG...]: VAR=$(COMMAND ARG...) without the $(...): the output goes through
# $tmpd/into (trailing newlines removed, as $(...) does); the status is COMMAND's.
into() {
    local _rc=0 _out=""
    "${@:2}" >"$tmpd/into" || _rc=$?
    IFS= read -r -d '' _out <"$tmpd/into" || true
    printf -v "$1" '%s' "${_out%"${_out##*[!$'\n']}"}"
    return "$_rc"
}

# ---------------------------------------------------------------------------------------------
# Temporary files, cleaned up on every exit path.

# Everything this script writes is a temporary file, and one of them holds the API key: keep
# them all private (0600 in a 0700 directory).
umask 077
tmpd=""
new_dir="" # the name new_tmpdir is creating: a signal can come before tmpd is set
curl_pid=""
# shellcheck disable=SC2317,SC2329  # called by traps
cleanup() {
    trap '' HUP INT TERM # a second signal must not cut the cleanup short (nor land in a $(...))
    local pids IFS=$' \t\n' # the default, whatever the interrupted command had set
    # curl_pid, and any background job a signal caught between its start and that assignment.
    pids=$(jobs -p)
    if [[ -n $curl_pid || -n $pids ]]; then
        # shellcheck disable=SC2086  # one pid per word
        kill $curl_pid $pids 2>/dev/null || true
        wait 2>/dev/null || true
    fi
    if [[ -n $tmpd ]]; then
        rm -rf -- "$tmpd"
    elif [[ -n $new_dir ]]; then
        rmdir -- "$new_dir" 2>/dev/null || true # empty: only just created
    fi
    tmpd="" new_dir="" curl_pid=""
}
# A signal cleans up itself before it exits: one that lands as the EXIT trap begins (the script
# ending anyway, e.g. its curl stopped by the same signal) runs its own trap inside that one, and
# an "exit" there ends the script at once, without the rest of the EXIT trap.
trap cleanup EXIT
trap 'cleanup; exit 129' HUP
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

# The temporary directory is named vision-client.<host>.<pid>.<8 hex digits>: a run killed with
# kill -9 (no trap runs) leaves it, the encoded image inside, and a later run removes it when it
# is this user's, made on this host, by a process that is gone (kill -0 fails), as the folder
# script sweeps its work directories. A pid in use again keeps it until that process ends;
# another host's (a TMPDIR shared over the network) and the vision-client.<8 hex digits>
# directories of earlier versions (no pid to tell by) are never touched.
tmp_prefix="${TMPDIR:-/tmp}/vision-client.${HOSTNAME:-}."

# sweep_dead_tmpdirs: remove what killed runs left (see tmp_prefix); one look at TMPDIR.
sweep_dead_tmpdirs() {
    local dead pid
    for dead in "$tmp_prefix"*; do
        [[ ${dead#"$tmp_prefix"} =~ ^([1-9][0-9]{0,9})\.[0-9a-f]{8}$ ]] || continue
        pid=${BASH_REMATCH[1]}
        [[ -d $dead && ! -L $dead && -O $dead ]] || continue
        if ((pid == $$)) || kill -0 "$pid" 2>/dev/null; then continue; fi
        rm -rf -- "$dead" 2>/dev/null || true
    done
}

# new_tmpdir: what mktemp -d does (mkdir fails on any existing name), but without a $(...).
new_tmpdir() {
    local dir tries
    sweep_dead_tmpdirs
    for ((tries = 0; tries < 100; tries++)); do
        if [[ -n ${SRANDOM:-} ]]; then # bash 5.1+
            printf -v dir '%s%s.%08x' "$tmp_prefix" "$$" "$SRANDOM"
        else
            printf -v dir '%s%s.%04x%04x' "$tmp_prefix" "$$" "$RANDOM" "$RANDOM"
        fi
        new_dir=$dir
        if mkdir -- "$dir"; then
            tmpd=$dir
            break
        fi
        new_dir=""
        [[ -e $dir ]] || break # not a name taken by another run: trying again will not help
    done
    [[ -n $tmpd ]] || die "$EXIT_ERROR" "cannot create a temporary directory in ${TMPDIR:-/tmp}"
    # curl reads its headers from a config file, so the API key never shows up in `ps`. Written
    # with one printf, whose failure (a full disk) is then told.
    local config='header = "Expect:"'$'\n'
    if [[ -n ${VISION_API_KEY:-} ]]; then
        local key=${VISION_API_KEY//\\/\\\\}
        key=${key//\"/\\\"}
        config+="header = \"Authorization: Bearer $key\""$'\n'
    fi
    local name value
    for name in Priority Client-Id; do
        value=${VISION_PRIORITY:-}
        [[ $name == Priority ]] || value=${VISION_CLIENT_ID:-}
        value=${value//[^A-Za-z0-9._:@-]/}
        [[ -z $value ]] || config+="header = \"X-$name: $value\""$'\n'
    done
    printf '%s' "$config" >"$tmpd/curlrc" 2>/dev/null || tmp_full "$tmpd/curlrc"
}

# tmp_full FILE: stop, saying that the temporary FILE could not be written and what to do (the
# shell's own "printf: write error: No space left on device" named neither file nor remedy).
tmp_full() {
    die "$EXIT_ERROR" "cannot write the temporary file $1: no space left in ${TMPDIR:-/tmp} (or it cannot be written there); free some space there, or set TMPDIR to a folder with space"
}

# tmp_has_room: whether a small file can still be written in the temporary directory (after a
# write that failed, to tell a full disk from a source that could not be read).
tmp_has_room() {
    { printf 'probe\n' >"$tmpd/probe"; } 2>/dev/null
}

# ---------------------------------------------------------------------------------------------
# HTTP

http_code=""

# server_message_into VAR: the error text from the last response: its "detail" (the server's
# error shape), an OpenAI-style error message, or the start of the body.
server_message_into() {
    local _msg=""
    if [[ -s $tmpd/resp ]]; then
        into _msg json_field "$tmpd/resp" detail ||
            into _msg json_field "$tmpd/resp" error 2>/dev/null ||
            into _msg body_start 300 '\r\n\t' || true
    fi
    trim_into _msg "$_msg"
    printf -v "$1" '%s' "${_msg:-no details in the response}"
}

# body_start N CHARS: the first N bytes of the last response, the CHARS (tr escapes) as spaces.
body_start() {
    head -c "$1" -- "$tmpd/resp" | tr "$2" '   '
}

# retry_after_into VAR: the last response's Retry-After in milliseconds, empty when it has none
# (or one this script cannot read). Read by the rules of every client (vision_server/client/
# retry.py): a number of seconds, its fraction kept (to the millisecond, rounded up), 0 or less
# meaning at once; or an HTTP date in any of RFC 9110's three forms, the time from now until then
# (0 when it is past).
retry_after_into() {
    local _line _text _value="" _hint_ms="" # (no local of the helpers below is called _hint_ms)
    while IFS= read -r _line || [[ -n $_line ]]; do
        _line=${_line//$'\r'/}
        [[ $_line =~ ^[Rr][Ee][Tt][Rr][Yy]-[Aa][Ff][Tt][Ee][Rr]:[[:space:]]*(.*[^[:space:]])[[:space:]]*$ ]] || continue
        _text=${BASH_REMATCH[1]}
        _value=""
        if seconds_ms_into _hint_ms "$_text" || http_date_ms_into _hint_ms "$_text"; then _value=$_hint_ms; fi
    done <"$tmpd/headers"
    printf -v "$1" '%s' "$_value"
}

# seconds_ms_into VAR TEXT: TEXT, a number of seconds ("5", "2.5", ".5", "-1"), in whole
# milliseconds (a finer fraction rounded up, a negative number 0); fails when TEXT is no number.
seconds_ms_into() {
    [[ $2 =~ ^([+-]?)([0-9]*)(\.([0-9]*))?$ && -n ${BASH_REMATCH[2]}${BASH_REMATCH[4]} ]] || return 1
    local _sign=${BASH_REMATCH[1]} _int=${BASH_REMATCH[2]} _frac=${BASH_REMATCH[4]} _n
    _int=${_int#"${_int%%[!0]*}"} # no leading zeros: bash would read 010 as octal
    ((${#_int} <= 9)) || _int=999999999 # past any cap; bash arithmetic would wrap
    _n=${_frac}000
    _n=$((10#${_int:-0} * 1000 + 10#${_n:0:3}))
    if [[ ${_frac:3} == *[1-9]* ]]; then _n=$((_n + 1)); fi # never wait less than asked
    if [[ $_sign == - ]]; then _n=0; fi
    printf -v "$1" '%s' "$_n"
}

# http_date_ms_into VAR DATE: the milliseconds from now until DATE, an HTTP date in any of the
# three forms RFC 9110 has recipients read (0 when it is past): "Sun, 06 Nov 1994 08:49:37 GMT"
# (IMF-fixdate), "Sunday, 06-Nov-94 08:49:37 GMT" (RFC 850: a two-digit year is 19YY from 69 on,
# else 20YY, as Python reads it) and "Sun Nov  6 08:49:37 1994" (C's asctime, in UTC). Counted
# here, not by date(1), whose BSD and GNU builds read different forms; fails on any other text,
# or on a date that does not exist (31 Feb, 08:49:60).
http_date_ms_into() {
    local _wd='(Mon|Tue|Wed|Thu|Fri|Sat|Sun)' _mo='(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)'
    local _hms='([0-9]{2}):([0-9]{2}):([0-9]{2})' _y _mon _d _h _mi _s _m _lim _days _now
    if [[ $2 =~ ^$_wd,\ ([0-9]{2})\ $_mo\ ([0-9]{4})\ $_hms\ GMT$ ]]; then
        _d=${BASH_REMATCH[2]} _mon=${BASH_REMATCH[3]} _y=$((10#${BASH_REMATCH[4]}))
        _h=${BASH_REMATCH[5]} _mi=${BASH_REMATCH[6]} _s=${BASH_REMATCH[7]}
    elif [[ $2 =~ ^(Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day,\ ([0-9]{2})-$_mo-([0-9]{2})\ $_hms\ GMT$ ]]; then
        _d=${BASH_REMATCH[2]} _mon=${BASH_REMATCH[3]} _y=$((10#${BASH_REMATCH[4]}))
        _h=${BASH_REMATCH[5]} _mi=${BASH_REMATCH[6]} _s=${BASH_REMATCH[7]}
        _y=$((_y > 68 ? 1900 + _y : 2000 + _y))
    elif [[ $2 =~ ^$_wd\ $_mo\ +([0-9]{1,2})\ $_hms\ ([0-9]{4})$ ]]; then
        _mon=${BASH_REMATCH[2]} _d=${BASH_REMATCH[3]}
        _h=${BASH_REMATCH[4]} _mi=${BASH_REMATCH[5]} _s=${BASH_REMATCH[6]} _y=$((10#${BASH_REMATCH[7]}))
    else
        return 1
    fi
    _m=" Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec"
    _m=${_m%%" $_mon"*}
    _m=$((${#_m} / 4 + 1))
    _d=$((10#$_d)) _h=$((10#$_h)) _mi=$((10#$_mi)) _s=$((10#$_s))
    _lim=(0 31 28 31 30 31 30 31 31 30 31 30 31)
    if ((_y % 4 == 0 && (_y % 100 != 0 || _y % 400 == 0))); then _lim[2]=29; fi
    ((_y >= 1 && _d >= 1 && _d <= _lim[_m] && _h <= 23 && _mi <= 59 && _s <= 59)) || return 1
    # Days since 1970-01-01 of a date in the proleptic Gregorian calendar (H. Hinnant's
    # days_from_civil), with March as the first month so that a leap day ends the year.
    local _yy=$((_m <= 2 ? _y - 1 : _y))
    local _era=$((_yy / 400)) _doy=$(((153 * (_m > 2 ? _m - 3 : _m + 9) + 2) / 5 + _d - 1))
    local _yoe=$((_yy - _era * 400))
    _days=$((_era * 146097 + _yoe * 365 + _yoe / 4 - _yoe / 100 + _doy - 719468))
    if [[ -n ${EPOCHREALTIME:-} ]]; then # bash 5: to the microsecond
        _now=${EPOCHREALTIME//[.,]/}
        _now=$((10#$_now / 1000))
    else
        printf -v _now '%(%s)T' -1 2>/dev/null || into _now date -u +%s
        _now=$((_now * 1000))
    fi
    _now=$(((_days * 86400 + _h * 3600 + _mi * 60 + _s) * 1000 - _now))
    printf -v "$1" '%s' "$((_now > 0 ? _now : 0))"
}

# retry_delay_into VAR ATTEMPT RETRY_AFTER: the wait before retry ATTEMPT (0 for the first), in
# seconds with three decimals; RETRY_AFTER is the server's, in milliseconds (empty: none).
retry_delay_into() {
    local _attempt=$2 _hint=$3 _ms=$RETRY_MAX_MS
    if [[ -n $_hint ]]; then
        _ms=$_hint
        ((_ms <= RETRY_AFTER_MAX_S * 1000)) || _ms=$((RETRY_AFTER_MAX_S * 1000))
        _ms=$((_ms + RANDOM % (_ms / 10 + 51))) # up to a tenth more, plus up to 50 ms
    else
        if ((_attempt < 6)); then # 500 << 6 is past the cap already; a larger shift could wrap
            _ms=$((RETRY_BASE_MS << _attempt))
            ((_ms <= RETRY_MAX_MS)) || _ms=$RETRY_MAX_MS
        fi
        _ms=$((_ms / 2 + RANDOM % (_ms / 2 + 1)))
    fi
    printf -v "$1" '%d.%03d' $((_ms / 1000)) $((_ms % 1000))
}

# speaks_https: whether an http:// --url's port answers HTTPS (any HTTP answer over TLS, the
# certificate unchecked: this only asks which protocol the port speaks).
speaks_https() {
    [[ $url == http://* ]] || return 1
    curl -q --silent --insecure --max-time 5 --output /dev/null -- "https://${url#http://}/health" </dev/null
}

# request METHOD PATH [BODYFILE]: sets http_code and leaves the body in $tmpd/resp. Exits on
# connection problems and timeouts; retries busy answers when --retries allows.
request() {
    local method=$1 path=$2 body=${3:-} attempt=0 rc wait_s time_connect
    local -a cmd=(curl -q --silent --show-error --config "$tmpd/curlrc" --request "$method"
        --max-time "$timeout" --connect-timeout "$connect_timeout"
        --output "$tmpd/resp" --dump-header "$tmpd/headers" --write-out '%{http_code} %{time_connect}')
    if [[ -n $body ]]; then
        cmd+=(--header 'Content-Type: application/json' --data-binary "@$body")
    fi
    cmd+=(-- "$url$path")
    while :; do
        : >"$tmpd/resp"
        : >"$tmpd/headers"
        # curl runs in the background so that a TERM signal is handled at once.
        "${cmd[@]}" >"$tmpd/code" 2>"$tmpd/curl.err" </dev/null &
        curl_pid=$!
        rc=0
        wait "$curl_pid" || rc=$?
        curl_pid=""
        read -r http_code time_connect _ <"$tmpd/code" || true
        case $rc in
        0) ;;
        28)
            # The connection never opened (a host that is down or rebooting drops it silently):
            # that is an unreachable server, not a slow answer that sending again would repeat.
            if [[ ${time_connect:-0} =~ ^[0.]*$ ]]; then
                die "$EXIT_CONNECT" "cannot connect to $url: no answer to the connection within the time limit (is the host up?)"
            fi
            die "$EXIT_TIMEOUT" "no answer from $url$path within ${timeout}s (--timeout)"
            ;;
        6) die "$EXIT_CONNECT" "cannot resolve the host in $url" ;;
        7) die "$EXIT_CONNECT" "cannot connect to $url (is the server running?)" ;;
        26) die "$EXIT_ERROR" "cannot read the request body file" ;;
        23) tmp_full "$tmpd/resp" ;; # curl could not write the answer down
        *)
            # 52 (empty reply) or 56 (reset) is how a TLS port hangs up on plain HTTP.
            if ((rc == 52 || rc == 56)) && speaks_https; then
                die "$EXIT_CONNECT" "$url hung up without an answer, and that port speaks HTTPS: use https://${url#http://}"
            fi
            local err line
            err=""
            while IFS= read -r line || [[ -n $line ]]; do # sed 's/^curl: ([0-9]*) //' | tr '\n' ' '
                if [[ $line =~ ^curl:\ \([0-9]*\)\  ]]; then line=${line#"${BASH_REMATCH[0]}"}; fi
                err+="$line "
            done <"$tmpd/curl.err"
            trim_into err "$err"
            die "$EXIT_CONNECT" "request to $url$path failed: ${err:-curl exit status $rc}"
            ;;
        esac
        case $http_code in
        429 | 502 | 503)
            if ((attempt < retries)); then
                local busy_msg hint
                retry_after_into hint
                retry_delay_into wait_s "$attempt" "$hint"
                attempt=$((attempt + 1))
                server_message_into busy_msg
                say "server busy (HTTP $http_code: $busy_msg); retry $attempt/$retries in ${wait_s}s"
                sleep "$wait_s" &
                curl_pid=$!
                wait "$curl_pid" || true
                curl_pid=""
                continue
            fi
            ;;
        esac
        return 0
    done
}

# from_proxy: whether the last answer is a proxy's own "no server behind me" (HAProxy, nginx):
# 502/503 without Retry-After and without a JSON body. A vision-server's 503 (queue full,
# draining) has both; 504 is a deadline a server ran past, not an outage.
from_proxy() {
    local first retry
    [[ $http_code == 502 || $http_code == 503 ]] || return 1
    retry_after_into retry
    [[ -z $retry ]] || return 1
    into first first_nonblank_byte || true
    [[ $first != "{" ]]
}

first_nonblank_byte() {
    LC_ALL=C tr -d ' \t\r\n' <"$tmpd/resp" | head -c 1
}

# proxy_page_text: a proxy's HTML error page as one short line of text.
proxy_page_text() {
    tr '\r\n\t' '   ' <"$tmpd/resp" | sed 's/<[^>]*>/ /g' | tr -s ' ' | head -c 200
}

# fail_http: report a non-200 answer and exit with a matching status.
fail_http() {
    local msg code=$EXIT_ERROR extra="" retry
    server_message_into msg
    if from_proxy; then # a restart behind a proxy: report it as the unreachable server it is
        into msg proxy_page_text || true
        trim_into msg "$msg"
        die "$EXIT_CONNECT" "cannot reach the server behind $url: the proxy answers HTTP $http_code ($msg)"
    fi
    case $http_code in
    000 | "") msg="no HTTP response" ;;
    401 | 403)
        code=$EXIT_AUTH
        if [[ -n ${VISION_API_KEY:-} ]]; then extra=" (VISION_API_KEY was sent)"; else extra=" (set VISION_API_KEY)"; fi
        ;;
    429 | 502 | 503)
        code=$EXIT_BUSY
        retry_after_into retry
        if [[ -n $retry && $retry != 0 ]]; then
            printf -v retry '%d.%03d' $((retry / 1000)) $((retry % 1000))
            while [[ $retry == *.*0 ]]; do retry=${retry%0}; done # 2.500 -> 2.5, 3.000 -> 3
            extra=" (retry after ${retry%.}s)"
        fi
        ;;
    504) code=$EXIT_TIMEOUT ;;
    400) if [[ $msg == "Invalid prompt"* ]]; then code=$EXIT_PROMPT; fi ;;
    esac
    die "$code" "HTTP $http_code: $msg$extra"
}

get_json() {
    request GET "$1"
    if [[ $http_code == 404 && -n ${2:-} ]]; then
        die "$EXIT_ERROR" "HTTP 404: this server has no $1 endpoint ($2)"
    fi
    [[ $http_code == 200 ]] || fail_http
}

# ---------------------------------------------------------------------------------------------
# Commands

cmd_caption() {
    local prompt=$1 image=$2 prompt_json model_json caption start shown
    local -a codes
    trim_into prompt "$prompt"
    prompt=${prompt#<}
    prompt=${prompt%>}
    trim_into prompt "$prompt"
    [[ -n $prompt ]] || usage_error "the prompt is empty"
    prompt="<${prompt^^}>"

    printable_into shown "$image"
    if [[ $image != - ]]; then
        [[ -e $image ]] || die "$EXIT_USAGE" "no such file: $shown"
        [[ -f $image && -r $image ]] || die "$EXIT_USAGE" "not a readable file: $shown"
        [[ -s $image ]] || die "$EXIT_USAGE" "the file is empty (0 bytes): $shown"
    fi
    new_tmpdir
    if [[ $image == - ]]; then
        if ! cat >"$tmpd/stdin-image" 2>/dev/null; then
            tmp_has_room || tmp_full "$tmpd/stdin-image"
            die "$EXIT_USAGE" "cannot read the image from stdin"
        fi
        [[ -s $tmpd/stdin-image ]] || die "$EXIT_USAGE" "no image data on stdin"
        image=$tmpd/stdin-image
    fi

    # Build {"prompt": ..., "image": "<base64>"} in a file: the image never becomes an argument.
    # A --model goes between them.
    if [[ $prompt =~ ^\<[A-Z0-9_]+\>$ ]]; then
        prompt_json="\"$prompt\"" # nothing to escape
    else
        into prompt_json json_quote "$prompt" || die "$EXIT_ERROR" "cannot encode the prompt as JSON"
    fi
    if [[ -n $model ]]; then # {"prompt": ..., "model": ..., "image": ...}
        into model_json json_quote "$model" || die "$EXIT_ERROR" "cannot encode the model name as JSON"
        prompt_json+=",\"model\":$model_json"
    fi
    printf '{"prompt":%s,"image":"' "$prompt_json" >"$tmpd/body" 2>/dev/null || tmp_full "$tmpd/body"
    if ! base64 <"$image" | tr -d '\r\n' >>"$tmpd/body" 2>/dev/null; then
        codes=("${PIPESTATUS[@]}")
        # tr failing to write is a full disk (base64 then dies of SIGPIPE); else the image.
        ((codes[1] == 0)) || tmp_full "$tmpd/body"
        die "$EXIT_USAGE" "cannot read or encode $shown"
    fi
    printf '"}' >>"$tmpd/body" 2>/dev/null || tmp_full "$tmpd/body"

    request POST /process_image "$tmpd/body"
    rm -f -- "$tmpd/body"
    [[ $http_code == 200 ]] || fail_http
    if ! into caption json_field "$tmpd/resp" result; then
        into start body_start 200 '\r\n' || true
        die "$EXIT_ERROR" "unexpected answer from the server (no \"result\"): $start"
    fi
    trim_into caption "$caption"
    printf '%s' "$caption"
    if ((newline)); then printf '\n'; fi
}

# url_quote_into VAR TEXT: TEXT percent-encoded for a query string (bytes other than
# A-Z a-z 0-9 . _ ~ - : /).
url_quote_into() {
    local LC_ALL=C _text=$2 _out="" _char _hex _i
    for ((_i = 0; _i < ${#_text}; _i++)); do
        _char=${_text:_i:1}
        case $_char in
        [A-Za-z0-9._~:/-]) _out+=$_char ;;
        *)
            printf -v _hex '%%%02X' "'$_char"
            _out+=$_hex
            ;;
        esac
    done
    printf -v "$1" '%s' "$_out"
}

cmd_prompts() {
    local path=/prompts quoted last
    if [[ -n $model ]]; then
        url_quote_into quoted "$model"
        path+="?model=$quoted"
    fi
    new_tmpdir
    get_json "$path"
    cat -- "$tmpd/resp"
    # End with exactly one newline, whatever the server sent.
    into last tail -c 1 -- "$tmpd/resp" || true
    [[ -z $last ]] || printf '\n'
}

cmd_model() {
    local name start
    new_tmpdir
    get_json /model
    if ! into name json_text "$tmpd/resp"; then
        into start head -c 200 -- "$tmpd/resp" || true
        die "$EXIT_ERROR" "unexpected answer from the server: $start"
    fi
    trim_into name "$name"
    printf '%s\n' "$name"
}

cmd_status() {
    local start
    new_tmpdir
    get_json /v1/status "it is not a vision-server; try '$PROG model' or '$PROG prompts'"
    if ! json_pretty "$tmpd/resp"; then
        into start head -c 200 -- "$tmpd/resp" || true
        die "$EXIT_ERROR" "unexpected answer from the server: $start"
    fi
}

case ${#args[@]} in
0)
    usage >&2
    exit "$EXIT_USAGE"
    ;;
1)
    case ${args[0],,} in
    prompts) cmd_prompts ;;
    model) cmd_model ;;
    status) cmd_status ;;
    *) usage_error "missing the image file (usage: $PROG <PROMPT> <image>)" ;;
    esac
    ;;
2) cmd_caption "${args[0]}" "${args[1]}" ;;
*) usage_error "too many arguments (usage: $PROG <PROMPT> <image>)" ;;
esac
