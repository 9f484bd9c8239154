"""Folds `perf script -F comm,tid,ip,sym,dso` output (read from stdin) into flame graph stacks
and a summary by thread and by component. Used by bench/profile.sh:

    perf script ... | python3 bench/profile_fold.py OUT_DIR DB MODE N C SIZE RATE

Writes OUT_DIR/folded.txt, OUT_DIR/summary.txt and OUT_DIR/summary.json.
"""

import collections
import json
import re
import sys

# The component a sample belongs to: the innermost frame (from the leaf outwards) that
# matches one of these, in this order of test. A copy or a system call made by SQLite counts
# as SQLite's, one made by HTTP/2 code as gRPC's, and so on; what matches nothing is "other".
COMPONENTS = [
    ("allocator", re.compile(r"^(_rjem_|je_|tcache_|arena_|extent_|pac_|sdallocx|rallocx|"
                             r"__rust_alloc|__rust_dealloc|__rust_realloc|__rustc::__rust_|"
                             r"malloc$|_int_malloc|_int_free|_int_realloc|cfree|free$|realloc$|"
                             r"__libc_malloc|__libc_free|__libc_realloc|__GI___libc_malloc|"
                             r"__GI___libc_free|malloc_consolidate|sysmalloc)")),
    ("tracing", re.compile(r"^(<)?(tracing|tracing_core|tracing_subscriber|sharded_slab|"
                           r"mailgate::telemetry)::|tracing::instrument|tracing_subscriber")),
    ("SQLite", re.compile(r"^(sqlite3|rusqlite|<rusqlite|vdbe|btree|pcache|pager|wal[A-Z]|"
                          r"balance_nonroot|sqlx_sqlite|<sqlx_sqlite|libsqlite3)")),
    ("PostgreSQL client", re.compile(r"^(<)?(sqlx_postgres|sqlx_core)::|sqlx_postgres")),
    ("SMTP", re.compile(r"^(<)?(lettre::|mailgate::delivery::smtp)|lettre::")),
    ("gRPC/HTTP/2", re.compile(r"^(<)?(h2|hyper|hyper_util|tonic|prost|http_body|tower|axum)::|"
                               r"[<:](h2|hyper|tonic|prost)::")),
    # The runtime's scheduler, timers, channels and its wait for events; its sockets
    # (tokio::net, tokio::io, a registration's I/O, mio) match nothing, so a send counts for
    # the code that sent.
    ("tokio runtime", re.compile(r"tokio::(?!runtime::io::registration)"
                                 r"(runtime|sync|time|task|loom|util)::")),
    ("mailgate", re.compile(r"mailgate::")),
]


def component(frames):
    """frames: (symbol, is_kernel) from the leaf outwards."""
    for sym, _ in frames:
        for name, pattern in COMPONENTS:
            if pattern.search(sym):
                return name
    return "other"


# The kernel's work, by what it was doing: the system call it was in (its entry point on the
# stack), else an interrupt, else scheduling.
SYSCALL = re.compile(r"^__(?:x64|ia32)_sys_(\w+)$")
SYSCALL_GROUPS = {
    "network": {"sendto", "recvfrom", "sendmsg", "recvmsg", "writev", "readv", "read", "write",
                "accept4", "connect", "shutdown", "setsockopt", "getsockopt"},
    "file writes and reads": {"pwrite64", "pread64", "pwritev", "preadv", "fcntl", "ftruncate",
                              "lseek", "openat", "close", "newfstatat", "fstat", "unlink"},
    "disk syncs": {"fsync", "fdatasync", "sync_file_range"},
    "waiting and waking": {"futex", "epoll_wait", "epoll_pwait", "epoll_ctl", "sched_yield",
                           "nanosleep", "clock_nanosleep"},
    "memory": {"madvise", "mmap", "munmap", "mprotect", "brk", "mremap"},
}


def kernel_activity(frames):
    """(group, detail) of a kernel sample; frames from the leaf outwards."""
    for sym, kernel in frames:
        if not kernel:
            break
        m = SYSCALL.match(sym)
        if m:
            call = m.group(1)
            for group, calls in SYSCALL_GROUPS.items():
                if call in calls:
                    return group, call
            return "other system calls", call
    syms = [sym for sym, kernel in frames if kernel]
    if any(s.startswith(("asm_sysvec", "asm_common_interrupt", "irq", "__do_softirq",
                         "handle_softirqs")) for s in syms):
        return "interrupts", "interrupts"
    return "scheduling and other", "other"


def parse(stream):
    """Yields (thread, [(symbol, is_kernel), ...] leaf first) per sample."""
    thread, frames = None, []
    for line in stream:
        line = line.rstrip("\n")
        if not line.strip():
            if thread is not None:
                yield thread, frames
            thread, frames = None, []
            continue
        if not line.startswith(("\t", " ")):
            # "comm  tid" (the thread's name may hold spaces; its id is the last field)
            head = line.split()
            thread = " ".join(head[:-1]) if len(head) > 1 else head[0]
            frames = []
            continue
        # "\t    addr symbol+off (dso)" or "... symbol (inlined)"
        m = re.match(r"\s*[0-9a-f]+\s+(.*?)\s+\(([^()]*)\)\s*$", line)
        if not m:
            continue
        sym, dso = m.group(1), m.group(2)
        sym = re.sub(r"\+0x[0-9a-f]+$", "", sym)
        if dso == "inlined" and frames:
            kernel = frames[-1][1]
        else:
            kernel = dso.startswith("[kernel")
        frames.append((sym if sym != "[unknown]" else f"[{dso.rsplit('/', 1)[-1]}]", kernel))
    if thread is not None:
        yield thread, frames


def main():
    out_dir, db, mode, n, c, size, rate = sys.argv[1:8]
    folded = collections.Counter()
    threads = collections.Counter()
    comps = collections.Counter()
    leaves = collections.Counter()
    kernel_groups = collections.Counter()
    syscalls = collections.Counter()
    total = 0
    for thread, frames in parse(sys.stdin):
        if not frames:
            continue
        total += 1
        threads[thread] += 1
        kernel = frames[0][1]
        comps[(component(frames), "kernel" if kernel else "user")] += 1
        leaves[(frames[0][0], "kernel" if kernel else "user")] += 1
        if kernel:
            group, detail = kernel_activity(frames)
            kernel_groups[group] += 1
            syscalls[(group, detail)] += 1
        names = [thread] + [s.replace(";", ":") for s, _ in reversed(frames)]
        folded[";".join(names)] += 1
    if total == 0:
        sys.exit("no samples in the profile")

    with open(f"{out_dir}/folded.txt", "w") as f:
        for stack, count in sorted(folded.items()):
            f.write(f"{stack} {count}\n")

    def pct(x):
        return round(100.0 * x / total, 1)

    by_component = collections.defaultdict(lambda: {"user": 0, "kernel": 0})
    for (name, side), count in comps.items():
        by_component[name][side] += count
    order = sorted(by_component, key=lambda k: -sum(by_component[k].values()))
    summary = {
        "db": db, "mode": mode, "messages": int(n), "concurrency": int(c), "size": int(size),
        "delivered_rate_under_profiler": int(rate), "samples": total,
        "kernel_share_percent": pct(sum(v["kernel"] for v in by_component.values())),
        "threads_percent": {t: pct(k) for t, k in threads.most_common()},
        "components_percent": {
            k: {"user": pct(by_component[k]["user"]), "kernel": pct(by_component[k]["kernel"])}
            for k in order
        },
        "kernel_percent": {g: pct(k) for g, k in kernel_groups.most_common()},
        "kernel_by_call_percent": {c: pct(k) for (_, c), k in syscalls.most_common()},
        "top_functions_percent": [
            {"function": f, "side": side, "percent": pct(k)} for (f, side), k in leaves.most_common(30)
        ],
    }
    with open(f"{out_dir}/summary.json", "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")

    lines = [
        f"mailgate profile: {db}, {mode}, N={n}, C={c}, {size}-byte messages; "
        f"{total} samples; {rate} emails/s delivered under the profiler",
        "",
        "by thread                      % of samples",
    ]
    lines += [f"  {t:<28} {pct(k):>6.1f}" for t, k in threads.most_common()]
    lines += ["", "by component (innermost on the stack)   user %  kernel %   total %"]
    for k in order:
        u, kk = by_component[k]["user"], by_component[k]["kernel"]
        lines.append(f"  {k:<36} {pct(u):>7.1f} {pct(kk):>9.1f} {pct(u + kk):>9.1f}")
    lines.append(f"  {'all':<36} {pct(total - sum(v['kernel'] for v in by_component.values())):>7.1f}"
                 f" {summary['kernel_share_percent']:>9.1f} {100.0:>9.1f}")
    lines += ["", "kernel time by activity (system call)  % of samples"]
    for g, k in kernel_groups.most_common():
        calls = [f"{c} {pct(n):.1f}" for (group, c), n in syscalls.most_common()
                 if group == g and n * 1000 >= total]
        lines.append(f"  {g:<36} {pct(k):>6.1f}  {', '.join(calls) if g not in ('interrupts', 'scheduling and other') else ''}".rstrip())
    lines += ["", "functions the samples landed in       %"]
    for (f, side), k in leaves.most_common(30):
        name = f if len(f) <= 90 else f[:87] + "..."
        lines.append(f"  {pct(k):>5.1f}  {'[k] ' if side == 'kernel' else ''}{name}")
    with open(f"{out_dir}/summary.txt", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
