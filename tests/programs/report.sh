#!/bin/sh
# Prints what a launched program sees: its ids and connection variables.
grep -E '^(Uid|Gid|Groups):' /proc/$$/status
echo "pid: $$ sid: $(cut -d" " -f6 /proc/$$/stat)"
env | sort
echo "ppid: $PPID"
