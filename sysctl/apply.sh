#!/usr/bin/env bash
# Apply sysctl/herald.conf to the running kernel and show what changed.
#
#   sysctl/apply.sh                 apply (root), print each key's value before and after
#   sysctl/apply.sh --check         only compare the running values with the file (no root needed)
#   sysctl/apply.sh --revert FILE   put back the values saved by an earlier apply
#   sysctl/apply.sh [opts] CONF     use another file instead of sysctl/herald.conf
#
# An apply saves the previous values to /var/tmp/herald-sysctl-before.<time>.conf first (a file in
# sysctl format, so --revert, or `sysctl -p` on it, restores them).
#
# This changes the running kernel only, until the next reboot. To keep the settings:
#   cp sysctl/herald.conf /etc/sysctl.d/60-herald.conf && sysctl --system
#
# Exit status: 0 when every key holds the file's value afterwards (keys marked with a leading "-"
# may be absent: their module is not loaded), 1 otherwise.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
MODE=apply CONF=$HERE/herald.conf REVERT=
while (($#)); do
  case $1 in
    --check) MODE=check ;;
    --revert) MODE=revert; REVERT=${2:?--revert needs the file an earlier apply saved}; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "apply.sh: unknown option $1" >&2; exit 2 ;;
    *) CONF=$1 ;;
  esac
  shift
done
[[ $MODE == revert ]] && CONF=$REVERT
[[ -r $CONF ]] || { echo "apply.sh: cannot read $CONF" >&2; exit 2; }
command -v sysctl >/dev/null || { echo "apply.sh: sysctl not found (apt-get install procps)" >&2; exit 2; }
if [[ $MODE != check && $EUID -ne 0 ]]; then
  echo "apply.sh: must run as root to change kernel settings (use --check to only compare)" >&2
  exit 2
fi

# key<TAB>value<TAB>optional(0/1) for every setting line of the file.
entries=$(awk '
  /^[[:space:]]*([#;]|$)/ { next }
  {
    line = $0; opt = 0
    sub(/^[[:space:]]+/, "", line)
    if (substr(line, 1, 1) == "-") { opt = 1; line = substr(line, 2) }
    eq = index(line, "="); if (!eq) next
    k = substr(line, 1, eq - 1); v = substr(line, eq + 1)
    gsub(/[[:space:]]+/, "", k); gsub(/^[[:space:]]+|[[:space:]]+$/, "", v); gsub(/[[:space:]]+/, " ", v)
    if (v == "") v = "(empty)"
    print k "\t" v "\t" opt
  }' "$CONF")

current() {   # value of key $1 with whitespace normalised, "(empty)", or "(absent)"
  local v
  v=$(sysctl -n "$1" 2>/dev/null) || { echo "(absent)"; return; }
  [[ -n $v ]] && echo "$v" | tr -s ' \t' '  ' || echo "(empty)"
}

declare -A BEFORE
while IFS=$'\t' read -r k v opt; do BEFORE[$k]=$(current "$k"); done <<< "$entries"

if [[ $MODE != check ]]; then
  if [[ $MODE == apply ]]; then
    saved=/var/tmp/herald-sysctl-before.$(date +%Y%m%d-%H%M%S).conf
    {
      echo "# values before sysctl/apply.sh applied $CONF on $(date -u +%FT%TZ); restore with:"
      echo "#   sysctl/apply.sh --revert $saved"
      while IFS=$'\t' read -r k v opt; do
        [[ ${BEFORE[$k]} == "(absent)" ]] && continue
        if [[ ${BEFORE[$k]} == "(empty)" ]]; then printf '%s =\n' "$k"; else printf '%s = %s\n' "$k" "${BEFORE[$k]}"; fi
      done <<< "$entries"
    } > "$saved"
    echo "previous values saved to $saved"
  fi
  echo "+ sysctl -p $CONF"
  # sysctl -p goes on after a refused key and exits non-zero; the table below tells which.
  sysctl -p "$CONF" > /dev/null 2> >(sed 's/^/  sysctl: /' >&2) || true
  sleep 0.1   # let the process substitution flush stderr before the table
fi

bad=0
printf '%-36s %-28s %-28s %s\n' KEY BEFORE "$([[ $MODE == check ]] && echo WANTED || echo AFTER)" RESULT
while IFS=$'\t' read -r k v opt; do
  after=$(current "$k")
  if [[ $after == "$v" ]]; then
    if [[ $MODE == check ]]; then res=ok; else
      [[ ${BEFORE[$k]} == "$v" ]] && res="accepted (unchanged)" || res=accepted; fi
  elif [[ $after == "(absent)" && $opt == 1 ]]; then
    res="skipped (key absent: its module is not loaded)"
  elif [[ $after == "(absent)" ]]; then
    res="REFUSED: no such key on this kernel"; bad=1
  elif [[ $MODE == check ]]; then
    res="differs"; bad=1
  else
    res="REFUSED: kernel kept $after"; bad=1
  fi
  col3=$([[ $MODE == check ]] && echo "$v" || echo "$after")
  printf '%-36s %-28s %-28s %s\n' "$k" "${BEFORE[$k]}" "$col3" "$res"
done <<< "$entries"

cat <<EOF

Open-file limits are separate from these keys. fs.nr_open only caps how high a process's own
RLIMIT_NOFILE may go; each process still needs its limit raised:
  - systemd unit:      LimitNOFILE=1048576
  - login sessions:    /etc/security/limits.conf: herald soft nofile 1048576 / herald hard nofile 1048576
  - Docker / compose:  --ulimit nofile=1048576:1048576 / ulimits: nofile: (see docker/compose.yml)
This shell: soft $(ulimit -Sn), hard $(ulimit -Hn) open files per process.
EOF
if [[ $(ulimit -Hn) != unlimited && $(ulimit -Hn) -lt 1048576 ]]; then
  cat <<EOF
The hard limit here ($(ulimit -Hn)) cannot be raised from inside this environment (even root lacks
the capability), so one herald process holds at most ~$(( $(ulimit -Hn) - 64 )) connections and one
load-generator process (a Tsung VM, herald-bench) about as many: spread a large test over several
processes (several herald nodes on the Redis bus, several Tsung client VMs).
EOF
fi
exit $bad
