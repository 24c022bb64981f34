//! The long help texts (`--help`, and the man pages generated from them):
//! what a page says beyond its option list. Sections are separated by blank
//! lines; a section's first line is its heading when it ends with a colon.

/// `vhost-clone --help`, after the one-line about.
pub const LONG_ABOUT: &str = "\
vhost-clone serves a disk to a VM over vhost-user-blk while it is copied \
(\"hydrated\") from a read-only source image onto a destination, with the \
semantics of Linux dm-clone: reads of regions not yet copied come from the \
source, writes go to the destination, and a background copy fills in the rest. \
A bitmap of hydrated regions is kept as crash-safe metadata beside the \
destination.";

/// `vhost-clone --help`, after the options.
pub const AFTER_HELP: &str = "\
EXIT STATUS:
0  success.
1  a runtime failure (a missing or unusable file, a clone in use, a live socket, damaged metadata, an unreachable daemon) or a failed check.
2  a usage error: an unknown, missing or conflicting option, a bad option value, or an option the clone contradicts.
159  serve only: a thread made a system call outside its seccomp filter (the line before names it; --sandbox).

ENVIRONMENT:
RUST_LOG  overrides --log-level with a tracing filter (e.g. vhost_clone=debug).
JOURNAL_STREAM  set by systemd; when it names stderr, log lines carry sd-daemon priorities (<3> error, <4> warning, <6> info, <7> debug) and no timestamp.

SEE ALSO:
vhost-clone-serve(1), vhost-clone-status(1), vhost-clone-message(1), vhost-clone-create(1), vhost-clone-check(1), vhost-clone-dump(1); docs/usage.md.";

/// `vhost-clone serve --help`, after the one-line about.
pub const SERVE_LONG_ABOUT: &str = "\
Serve a clone of SOURCE over vhost-user-blk (the main job). \
The first start of a clone creates the destination (the source's size) and \
formats the metadata; later starts check that source, destination and \
metadata agree. The daemon listens on a unix socket for one vhost-user \
frontend at a time (QEMU, cloud-hypervisor) and serves the next one when it \
disconnects.";

/// `vhost-clone serve --help`, after the options.
pub const SERVE_AFTER_HELP: &str = "\
FILES:
DEST.meta  the metadata (superblocks and the hydration bitmap), unless --metadata.
DEST.sock  the vhost-user socket (mode 0600, or --socket-mode/--socket-group), unless --socket-path, --fd or socket activation.
SOCKET.ctl  the control socket for status and message, unless --control-socket.
RUNTIME_DIR/vhost-clone-UUID.live  the live region map (--runtime-dir, /dev/shm): lets a restart after kill -9 keep every acknowledged write.

SIGNALS:
SIGTERM, SIGINT, SIGHUP  stop cleanly: no new request is taken, those in flight finish, the connection closes, a final commit runs, exit 0.

EXIT STATUS:
0  stopped cleanly.
1  a runtime failure: the clone is in use, a socket is live or its directory missing, a file is missing or unusable, the final commit failed.
2  a usage error.
159  a thread made a system call outside its seccomp filter (the line before names it; --sandbox none turns the sandbox off). Like kill -9, it loses no acknowledged write.

ENVIRONMENT:
NOTIFY_SOCKET  set by systemd (Type=notify): READY=1 once serving, STATUS= with hydration progress, STOPPING=1 on a stop.
WATCHDOG_USEC, WATCHDOG_PID  set by systemd (WatchdogSec=): WATCHDOG=1 every half period while no commit is stuck.
LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES  set by systemd (socket activation): serve on the passed vhost-user socket, and on one named control as the control socket.
JOURNAL_STREAM  log lines carry sd-daemon priorities when stderr is the journal.

EXAMPLE:
vhost-clone serve --source golden.img --dest clone.img
qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=RAM,share=on -numa node,memdev=mem -chardev socket,id=vc0,path=clone.img.sock,reconnect-ms=1000 -device vhost-user-blk-pci,chardev=vc0";
