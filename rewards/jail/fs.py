"""The sandbox's filesystem: a new root that holds only what the interpreter needs (runs in PID 1, as root of the
sandbox's mount namespace, before anything untrusted starts).

    /                      tmpfs, read-only once built
    <interpreter stdlib>   read-only binds of `sys.path` of `python -I -S` (stdlib, lib-dynload), at their host paths
    <site-packages>        an empty read-only tmpfs over each site/dist-packages directory inside those binds
    <library dirs>         read-only binds of the directories holding the interpreter's shared libraries
    /etc/ld.so.cache       read-only bind (where the loader finds them), when the host has one
    /dev/{null,zero,full,random,urandom}   binds of the host's device nodes
    /proc                  a fresh proc of the sandbox's PID namespace (it sees only sandbox processes)
    /tmp                   tmpfs of `tmp_bytes` (the only writable place), /tmp/work the program's cwd;
                           /var/tmp and /dev/shm are symlinks to it

pivot_root then detaches the host's root: no host path (home, checkout, data, runs) exists in the namespace.
"""
import ctypes
import os
import platform

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
ST_RELATIME = 4096
MNT_DETACH = 2
DEVICES = ("null", "zero", "full", "random", "urandom")
WORK = "/tmp/work"
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None):
    def enc(text):
        return text.encode() if text is not None else None

    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _locked_flags(path):
    """The flags a read-only remount must keep (in a user namespace, dropping nosuid/nodev/... is refused)."""
    flags = os.statvfs(path).f_flag
    out = flags & (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME)
    return out | (MS_RELATIME if flags & ST_RELATIME else 0)


def _bind_readonly(source, target):
    _mount(source, target, None, MS_BIND)
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | _locked_flags(source))


def enter_new_root(new_root, binds, tmp_bytes, work_uid, hidden=()):
    """Build the view described above on the empty directory `new_root` and make it `/`; cwd becomes /.
    `hidden`: directories inside the binds (site-packages) covered by an empty read-only tmpfs."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    _mount("tmpfs", new_root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path in binds:
        target = new_root + path
        if os.path.isdir(path):
            os.makedirs(target, exist_ok=True)
        elif os.path.isfile(path):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "wb").close()
        else:
            continue  # gone since the parent listed it: the interpreter will say what it misses
        _bind_readonly(path, target)
    for path in hidden:
        if os.path.isdir(new_root + path):
            _mount("tmpfs", new_root + path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555")
    os.makedirs(new_root + "/dev")
    for name in DEVICES:
        source = "/dev/" + name
        if os.path.exists(source):
            open(new_root + source, "wb").close()
            _mount(source, new_root + source, None, MS_BIND)
    os.mkdir(new_root + "/proc")
    _mount("proc", new_root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.mkdir(new_root + "/tmp")
    _mount("tmpfs", new_root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_bytes},mode=1777")
    os.makedirs(new_root + "/var")
    for alias in ("/var/tmp", "/dev/shm"):  # the usual scratch places: the same (carved-out) tmpfs
        os.symlink("/tmp", new_root + alias)
    os.mkdir(new_root + WORK, 0o700)
    if work_uid is not None:
        os.chown(new_root + WORK, work_uid, work_uid)
    _mount(None, new_root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(new_root)
    number = _PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise OSError(f"pivot_root: unknown syscall number on {platform.machine()}")
    _check(_libc.syscall(number, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")  # the host's root, stacked under ours
    os.chdir("/")
