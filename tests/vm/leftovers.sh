#!/bin/bash
# Run in the guest after the suites: the guest must be as clean as it booted. Prints each kind of
# leftover (named network namespaces, links besides lo, nftables tables, processes, mounts under
# /run or /tmp, files in /tmp) and exits 1 if there is any.
set -u
left=0
report() { # what, list
  if [ -n "$2" ]; then
    echo "left behind: $1:"
    echo "$2" | sed 's/^/  /'
    left=1
  fi
}
report "network namespaces" "$(ip netns list)"
report "links" "$(ip -o link show | awk -F': ' '$2 != "lo" { print $2 }')"
report "nftables tables" "$(nft list tables)"
# Processes: all but kernel threads, pid 1, this script's ancestry and its own children (ps).
procs=$(ps -eo pid=,ppid=,args= | awk -v self=$$ '
  { pid[NR] = $1; parent[$1] = $2; line[NR] = $0 }
  END {
    anc[1] = 1
    for (p = self; p > 1; p = parent[p]) anc[p] = 1
    for (i = 1; i <= NR; i++) {
      p = pid[i]; q = p; skip = (p in anc) || p == 2
      while (!skip && q > 2) { q = parent[q]; if (q == self || q == 2) skip = 1 }
      if (!skip) print line[i]
    }
  }')
report "processes" "$procs"
# /run/netns itself is a mount once `ip netns add` has run (iproute2 makes it shared); what is
# mounted under it is what counts.
report "mounts" "$(awk '$5 ~ "^/(run|tmp)/" && $5 != "/run/netns" { print $5 " (" $9 ")" }' /proc/self/mountinfo)"
report "files in /tmp" "$(ls -A /tmp)"
[ "$left" = 0 ] && echo "nothing left behind"
exit "$left"
