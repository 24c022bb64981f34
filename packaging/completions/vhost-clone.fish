# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_vhost_clone_global_optspecs
    string join \n log-level= v/verbose print-capabilities h/help V/version
end

function __fish_vhost_clone_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_vhost_clone_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_vhost_clone_using_subcommand
    set -l cmd (__fish_vhost_clone_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c vhost-clone -n "__fish_vhost_clone_needs_command" -l log-level -d 'Log level; RUST_LOG overrides it (tracing\'s EnvFilter syntax)' -r -f -a "error\t'Errors only'
warn\t'Errors and warnings (`warning` is accepted too, as syslog spells it)'
info\t'Also state changes: start, stop, commits adopted, hydration complete'
debug\t'Also details useful when debugging'
trace\t'Everything'"
complete -c vhost-clone -n "__fish_vhost_clone_needs_command" -s v -l verbose -d 'More logging (-v debug, -vv trace)'
complete -c vhost-clone -n "__fish_vhost_clone_needs_command" -l print-capabilities -d 'Print the vhost-user backend capabilities (JSON, QEMU\'s vhost-user.json schema) and exit'
complete -c vhost-clone -n "__fish_vhost_clone_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vhost-clone -n "__fish_vhost_clone_needs_command" -s V -l version -d 'Print version'
complete -c vhost-clone -n "__fish_vhost_clone_needs_command" -f -a "serve" -d 'Serve a clone of SOURCE over vhost-user-blk (the main job)'
complete -c vhost-clone -n "__fish_vhost_clone_needs_command" -f -a "status" -d 'Show a running daemon\'s status (progress, mode, counters)'
complete -c vhost-clone -n "__fish_vhost_clone_needs_command" -f -a "message" -d 'Send a dm-clone message to a running daemon'
complete -c vhost-clone -n "__fish_vhost_clone_needs_command" -f -a "create" -d 'Format metadata for a new clone of SOURCE onto DEST (DEST is created if missing)'
complete -c vhost-clone -n "__fish_vhost_clone_needs_command" -f -a "check" -d 'Validate a clone\'s metadata (and its agreement with source and destination)'
complete -c vhost-clone -n "__fish_vhost_clone_needs_command" -f -a "dump" -d 'Show which regions are hydrated'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -s s -l source -d 'The source image, opened read-only and never written: a file or block device, or an NBD export (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH). May be left out once hydration is complete' -r -F
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -s d -l dest -d 'The destination (created with the source\'s size if missing)' -r -F
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -s m -l metadata -d 'The metadata file [default: DEST.meta]; formatted on first start' -r -F
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l socket-path -d 'The vhost-user socket to create (mode 0600) [default: DEST.sock]' -r -F
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l socket-group -d 'Group of the vhost-user socket, a name or a number (e.g. libvirt-qemu, the group libvirt runs QEMU in); makes the default --socket-mode 0660' -r
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l socket-mode -d 'Mode of the vhost-user socket, octal, never writable by others (connecting needs write) [default: 0600, or 0660 with --socket-group]' -r
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l fd -d 'Serve on an inherited, listening unix socket instead of creating one' -r
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l control-socket -d 'The control socket for `status` and `message` [default: SOCKET.ctl, or DEST.ctl with --fd]' -r -F
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l num-queues -d 'Number of request queues, one worker thread each [default: the number of CPUs, at most 16, which is what QEMU\'s vhost-user-blk-pci asks for by default]' -r
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l queue-size -d 'Largest virtqueue size a frontend may choose (power of two)' -r
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -s r -l region-size -d 'Region size for a new clone (power of two, 4K..1G); must match an existing one' -r
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l partial-regions -d 'For a new clone: regions that may be partly written at once (see `create --partial-regions`); 0: none (metadata version 1). Must match an existing one' -r
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l serial -d 'The disk\'s serial number (GET_ID), at most 20 bytes' -r
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l commit-interval -d 'Seconds between periodic metadata commits (0 disables them)' -r
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l source-timeout -d 'With an NBD source: seconds a source read may wait for the server, reconnecting included, before it fails with an I/O error' -r
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l source-connections -d 'With an NBD source that allows several connections (NBD_FLAG_CAN_MULTI_CONN): how many to open, 1 to 16' -r
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l hydration-threshold -d 'Regions in flight at most for background hydration (0 pauses it; at most 65536)' -r
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l hydration-batch-size -d 'Adjacent regions copied together by background hydration (at most 4096)' -r
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l hydration-rate -d 'Bytes per second background hydration may read from the source, for a source shared with others (guest reads are never held back): digits with an optional binary K, M, G or T and an optional /s (100M = 100 MiB/s); 0 is unlimited. `message hydration-rate RATE` changes it at run time' -r
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l io-engine -d 'How queues execute reads and writes (and the region copies of writes into unhydrated regions): `uring` keeps many in flight per queue through io_uring, `sync` does one blocking call at a time; `auto` picks `uring` with --direct and `sync` otherwise' -r -f -a "auto\t'`uring` with --direct, `sync` otherwise'
uring\t'io_uring, many requests in flight per queue'
sync\t'One blocking system call at a time per queue'"
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l interrupt-hold -d 'Interrupt moderation: while a driver keeps two or more requests in flight on a queue and sends them one by one, wait up to this many microseconds for its next request before interrupting it, so that one interrupt covers more completions (an emulated guest pays dearly for each). The wait adapts to the driver and stops when it does not pay; a driver at queue depth 1 is never kept waiting. 0 (or anything below 10) turns it off' -r
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l runtime-dir -d 'Where the live region map is kept: a RAM file system that outlives this process but not a reboot, so that a restart after kill -9 keeps every acknowledged write; `none` keeps it in process memory only' -r -F
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l metrics-address -d 'Serve Prometheus metrics at http://HOST:PORT/metrics (an IP address and a port; port 0 picks a free one, which `status` shows)' -r
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l sandbox -d 'Confinement: `auto` installs a seccomp filter per thread and, where the kernel has Landlock, limits the file system to removing our sockets and live map; `none` turns both off (a warning is logged)' -r -f -a "auto\t'seccomp filters (required) and Landlock where the kernel has it'
none\t'No confinement (a warning is logged)'"
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l log-level -d 'Log level; RUST_LOG overrides it (tracing\'s EnvFilter syntax)' -r -f -a "error\t'Errors only'
warn\t'Errors and warnings (`warning` is accepted too, as syslog spells it)'
info\t'Also state changes: start, stop, commits adopted, hydration complete'
debug\t'Also details useful when debugging'
trace\t'Everything'"
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l read-only -d 'Offer a read-only disk to the guest (no writes, no hydration; `--readonly` is an alias)'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l no-discard-passdown -d 'Do not pass discards of hydrated ranges down to the destination'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l no-hydration -d 'Start with background hydration disabled (`message enable-hydration` starts it)'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l detect-zeroes -d 'Write all-zero source data as holes on the destination'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l direct -d 'Open source and destination with O_DIRECT (bypass the host page cache)'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l retire-out-of-order -d 'With the io_uring engine and a frontend that keeps an in-flight area (QEMU\'s INFLIGHT_SHMFD), complete requests as they finish instead of in the order they were taken from the queue. Correct either way (a restart resubmits what was in flight); measured slower for a TCG guest at QD32, it may help on disks whose latency varies widely'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l standby -d 'Stand by for a migration over shared storage: answer frontends at once with the clone\'s shape (read from its metadata), and once a frontend started its queues here and the daemon that serves the clone stopped, take the clone over, with everything that daemon committed, and serve it. The clone must exist'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -l print-capabilities -d 'Print QEMU\'s vhost-user capabilities JSON and exit (as `vhost-clone --print-capabilities`)'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -s v -l verbose -d 'More logging (-v debug, -vv trace)'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand serve" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand status" -s c -l control-socket -d 'The control socket [default: SOCKET.ctl, or DEST.sock.ctl]' -r -F
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand status" -l socket-path -d 'The daemon\'s vhost-user socket (its control socket is SOCKET.ctl)' -r -F
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand status" -s d -l dest -d 'The clone\'s destination (its control socket is DEST.sock.ctl by default, DEST.ctl for a daemon started with --fd or by socket activation)' -r -F
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand status" -l interval -d 'Seconds between updates with --watch' -r
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand status" -l log-level -d 'Log level; RUST_LOG overrides it (tracing\'s EnvFilter syntax)' -r -f -a "error\t'Errors only'
warn\t'Errors and warnings (`warning` is accepted too, as syslog spells it)'
info\t'Also state changes: start, stop, commits adopted, hydration complete'
debug\t'Also details useful when debugging'
trace\t'Everything'"
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand status" -l json -d 'Print the status as JSON'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand status" -l dmsetup -d 'Print one line in the form `dmsetup status` gives a dm-clone target'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand status" -s w -l watch -d 'Keep printing (a progress bar in a terminal) until hydration completes'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand status" -s v -l verbose -d 'More logging (-v debug, -vv trace)'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand status" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand message" -s c -l control-socket -d 'The control socket [default: SOCKET.ctl, or DEST.sock.ctl]' -r -F
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand message" -l socket-path -d 'The daemon\'s vhost-user socket (its control socket is SOCKET.ctl)' -r -F
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand message" -s d -l dest -d 'The clone\'s destination (its control socket is DEST.sock.ctl by default, DEST.ctl for a daemon started with --fd or by socket activation)' -r -F
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand message" -l log-level -d 'Log level; RUST_LOG overrides it (tracing\'s EnvFilter syntax)' -r -f -a "error\t'Errors only'
warn\t'Errors and warnings (`warning` is accepted too, as syslog spells it)'
info\t'Also state changes: start, stop, commits adopted, hydration complete'
debug\t'Also details useful when debugging'
trace\t'Everything'"
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand message" -s v -l verbose -d 'More logging (-v debug, -vv trace)'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand message" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand create" -s s -l source -d 'The source image (opened read-only, never written): a file or block device, or an NBD URI (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH)' -r -F
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand create" -s d -l dest -d 'The destination (the clone)' -r -F
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand create" -s m -l metadata -d 'The metadata file [default: DEST.meta]' -r -F
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand create" -s r -l region-size -d 'Region size (power of two, 4K..1G), e.g. 64K' -r
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand create" -l partial-regions -d 'Regions that may be partly written at once: a write of whole 4 KiB sub-blocks into an unhydrated region writes only them, recorded in a table of this many slots (16 bytes each) [default: 65536, or one per region for a smaller clone]; 0: no table, every such write copies its region (metadata format version 1, which daemons before version 2 can open)' -r
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand create" -l log-level -d 'Log level; RUST_LOG overrides it (tracing\'s EnvFilter syntax)' -r -f -a "error\t'Errors only'
warn\t'Errors and warnings (`warning` is accepted too, as syslog spells it)'
info\t'Also state changes: start, stop, commits adopted, hydration complete'
debug\t'Also details useful when debugging'
trace\t'Everything'"
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand create" -l force -d 'Overwrite metadata that is already formatted (the clone restarts from scratch)'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand create" -s v -l verbose -d 'More logging (-v debug, -vv trace)'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand create" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand check" -s s -l source -d 'The source image (opened read-only, never written): a file or block device, or an NBD URI (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH)' -r -F
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand check" -s d -l dest -d 'The destination (the clone)' -r -F
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand check" -s m -l metadata -d 'The metadata file [default: DEST.meta]' -r -F
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand check" -l log-level -d 'Log level; RUST_LOG overrides it (tracing\'s EnvFilter syntax)' -r -f -a "error\t'Errors only'
warn\t'Errors and warnings (`warning` is accepted too, as syslog spells it)'
info\t'Also state changes: start, stop, commits adopted, hydration complete'
debug\t'Also details useful when debugging'
trace\t'Everything'"
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand check" -l json -d 'Print the report as JSON'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand check" -s v -l verbose -d 'More logging (-v debug, -vv trace)'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand check" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand dump" -s s -l source -d 'The source image (opened read-only, never written): a file or block device, or an NBD URI (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH)' -r -F
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand dump" -s d -l dest -d 'The destination (the clone)' -r -F
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand dump" -s m -l metadata -d 'The metadata file [default: DEST.meta]' -r -F
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand dump" -l log-level -d 'Log level; RUST_LOG overrides it (tracing\'s EnvFilter syntax)' -r -f -a "error\t'Errors only'
warn\t'Errors and warnings (`warning` is accepted too, as syslog spells it)'
info\t'Also state changes: start, stop, commits adopted, hydration complete'
debug\t'Also details useful when debugging'
trace\t'Everything'"
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand dump" -l json -d 'Print JSON'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand dump" -s v -l verbose -d 'More logging (-v debug, -vv trace)'
complete -c vhost-clone -n "__fish_vhost_clone_using_subcommand dump" -s h -l help -d 'Print help (see more with \'--help\')'
