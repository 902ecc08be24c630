"""What both peer runners share; imported from the script's own directory (no lowbit import)."""

import resource


def peak_rss_bytes() -> int:
    """VmHWM of this process. Not ru_maxrss: Linux carries the parent's high-water mark across
    fork/exec into ru_maxrss, so a child of a large process would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: KiB
