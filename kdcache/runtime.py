"""Process-level settings shared by every stage: the 'kdcache' logger, allocator tuning, device choice, atomic folder
writes, and the few collective steps a launch of several processes needs (accelerate launch, torchrun)."""

import contextlib
import ctypes
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from kdcache.errors import KdcacheError

if TYPE_CHECKING:
    import torch


class _Stdout(logging.StreamHandler):
    """A handler that writes to whatever sys.stdout is when a line is logged (a redirect, a test's capture)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def log_to_stdout() -> None:
    """What the stages have to say (a cache up to date, the batch a run trains with, its result) goes through the
    'kdcache' logger, to stdout as plain lines by default, as print did; silence or redirect it with the logging
    module (logging.getLogger("kdcache").setLevel(logging.WARNING)). Called when kdcache is imported."""
    log = logging.getLogger("kdcache")
    if not log.handlers:
        log.addHandler(_Stdout())
        log.setLevel(logging.INFO)
        log.propagate = False


_malloc_tuned = False


def tune_malloc() -> bool:
    """Keep glibc from returning large buffers to the OS after every forward/backward pass.

    By default glibc serves allocations above a threshold with mmap and unmaps them on free, so every
    training step pays page faults to map and zero the same activation buffers again; on a 2-core CPU that
    halves throughput (BENCHMARKS.md). `mallopt` sets the same knobs as MALLOC_MMAP_MAX_=0 and
    MALLOC_TRIM_THRESHOLD_, at run time, for this process only. The cost is a higher resident peak (freed
    memory stays in the heap for reuse). Set KDCACHE_MALLOC_TUNING=0 to opt out.
    """
    global _malloc_tuned
    if _malloc_tuned or os.environ.get("KDCACHE_MALLOC_TUNING", "1") == "0":
        return _malloc_tuned
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
        _malloc_tuned = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        _malloc_tuned = False
    return _malloc_tuned


class MappedFiles:
    """Keeps the memory-mapped files under `folders` (a cache's Arrow files) from piling up in this process's RSS.

    `datasets` reads a cache through memory maps, and every page a random batch touches stays mapped into the process
    until the file is closed; recent kernels map a whole large page-cache folio per fault (up to 2 MB; 64 to 72 MB for
    a batch of 32 rows of benchmarks/scale.py), so a few hundred random batches map most of a cache, and the peak RSS
    of training grows with the cache (2.5x from 10k to 100k rows) though the process's own memory does not. `read()`,
    called once per batch read, asks the kernel to unmap those files' pages (madvise MADV_DONTNEED: they stay in the
    page cache, and the next read maps them again from there, a minor fault), so that at most about one batch's pages
    stay mapped. The files' mappings are looked up in /proc/self/maps on every call, so that only ranges that map
    those files at that moment are touched (a range unmapped since, and reused for the process's own memory, must
    never be: MADV_DONTNEED would zero it); elsewhere than on Linux, nothing is done. With a 100k-row cache mapped, a
    call costs about 4.9 ms of CPU (most of it the kernel writing /proc/self/maps) and the faults that map the next
    batch's pages again the rest of about 11 ms per batch of 32 (BENCHMARKS.md); set KDCACHE_RELEASE_MAPPED=0 to opt
    out."""

    DONTNEED = 4  # <sys/mman.h>, the same on every Linux architecture

    def __init__(self, folders):
        self.prefixes = tuple(str(Path(folder).resolve()) + os.sep for folder in folders)
        self.madvise = None
        if sys.platform.startswith("linux") and os.environ.get("KDCACHE_RELEASE_MAPPED", "1") != "0":
            try:
                self.madvise = ctypes.CDLL(None, use_errno=True).madvise
                self.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            except (OSError, AttributeError):
                self.madvise = None

    def read(self) -> None:
        if self.madvise is None:
            return
        for start, end in self.mappings():
            self.madvise(start, end - start, self.DONTNEED)

    def mappings(self) -> list[tuple[int, int]]:
        """(start, end) of this process's mappings of files under the folders."""
        try:
            with open("/proc/self/maps") as maps:
                lines = maps.read().splitlines()
        except OSError:
            return []
        found = []
        for line in lines:  # "start-end perms offset device inode   /path"
            path = line.find(" /")
            if path > 0 and line.startswith(self.prefixes, path + 1):
                start, end = line[: line.index(" ")].split("-")
                found.append((int(start, 16), int(end, 16)))
        return found

    def __getstate__(self):  # a DataLoader worker looks up its own mappings, and its own handle on madvise
        return {"prefixes": self.prefixes}

    def __setstate__(self, state):
        self.__init__([])
        self.prefixes = state["prefixes"]


def pick_device(device: str = "auto"):
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise KdcacheError(f"--device '{device}' is not a device name; use auto, cpu, cuda, cuda:1 or mps") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise KdcacheError(f"--device '{device}' asked for CUDA but no CUDA GPU is available; use --device cpu")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise KdcacheError(
            f"--device '{device}': this machine has {count} CUDA GPU{'s' if count > 1 else ''} "
            f"(cuda:0 to cuda:{count - 1}); pick one of them"
        )
    return chosen


@dataclass(frozen=True)
class Placement:
    """Where and how a stage computes: its device, its precision and how many processes share the work."""

    device: "torch.device"
    precision: str
    processes: int

    def describe(self, per_process_batch: int) -> str:
        """The effective contract in one line, e.g. 'global batch 32 = 1 process x 32 on cuda:0, bf16'."""
        plural = "es" if self.processes > 1 else ""
        return (
            f"global batch {per_process_batch * self.processes} = {self.processes} process{plural} x "
            f"{per_process_batch} on {self.device}, {self.precision}"
        )


def placement(device: str, precision: str, processes: "Processes | None", training: bool) -> Placement:
    """The one resolver of --device, --precision and the process count, shared by the stages. Under several
    processes on CUDA each process takes the GPU of its local index. Stage two (`training`) names the GPU that
    `cuda` means and resolves --precision auto (kdcache.devices); stage one computes in fp32 unless told otherwise."""
    tune_malloc()
    chosen = pick_device(device)
    if training:
        from kdcache.devices import resolve_cuda

        chosen = resolve_cuda(chosen)
    if processes and chosen.type == "cuda":
        chosen = processes.device  # one GPU per process
    if training:
        from kdcache.devices import training_precision

        precision = training_precision(precision, chosen)
    elif precision != "fp32" and chosen.type != "cuda":
        raise KdcacheError(f"--precision {precision} needs a CUDA device (on CPU it is slower than fp32); use fp32")
    return Placement(chosen, precision, processes.count if processes else 1)


def check_writable_parent(path: Path, what: str) -> None:
    """Fail early, before hours of work, if the output cannot be created."""
    parent = path.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise KdcacheError(f"{what} '{path}' cannot be created ({error.strerror}); choose another --output") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise KdcacheError(f"{what} '{path}' is in a folder that is not writable ({parent}); choose another --output")


def output_path(output, flag: str = "--output") -> Path:
    """The output folder of a stage, refused when it is the current folder or one of its parents: a stage replaces
    its output by renaming a finished folder onto it, and must never swap out the folder it runs in.

    A URL is refused, except fsspec's local `file://` (its path is used): a stage writes into OUTPUT.partial, fsyncs,
    holds a lock file and renames the finished folder into place, which object stores (s3://, gs://, hf://) cannot
    do atomically. Several machines share a cache through a shared filesystem (NFS, Lustre) mounted as a path."""
    text = str(output)
    if "://" in text:
        protocol = text.split("://", 1)[0]
        if protocol != "file":
            raise KdcacheError(
                f"{flag} '{output}' is a {protocol}:// URL; kdcache writes its outputs on a filesystem (it renames the "
                f"finished folder into place): give a local or shared (NFS) path, then copy the folder where you want it"
            )
        text = text[len("file://") :]
    path = Path(text).expanduser()
    resolved = path.resolve()
    if path.name in ("", ".", "..") or resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise KdcacheError(
            f"{flag} '{output}' is the current folder or one of its parents; name a folder of its own "
            f"(e.g. {flag} data/NAME)"
        )
    return path


def move_into_place(finished: Path, destination: Path) -> None:
    """Rename a completed folder onto its final name; an existing destination is swapped out, then removed."""
    old = destination.with_name(destination.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if destination.exists():
        destination.rename(old)
    finished.rename(destination)
    if old.exists():
        shutil.rmtree(old)


def slug(name_or_path: str) -> str:
    """A folder-name-safe short name: 'merve/beans-vit-224' -> 'beans-vit-224'."""
    text = str(name_or_path).rstrip("/\\")
    base = text.replace("\\", "/").split("/")[-1] or "dataset"
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in base)


# Several processes: `accelerate launch` (or torchrun, mpirun) starts one process per GPU or per share of the CPU
# cores and describes the launch in environment variables. A plain run has none of them, and then nothing below
# starts or imports anything: `distributed()` returns None and every stage runs exactly as on one process.

_WORLD_SIZE = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_LOCAL_WORLD_SIZE = ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")
_LOCAL_RANK = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")
# A collective waits for the slowest process: at the end of stage one the others wait for the last chunks of the
# slowest one, and with many views per image a process's share can take longer than torch's default 30 minutes. A process
# that dies does not leave the others waiting this long: the launcher ends them (and gloo notices a closed peer).
COLLECTIVE_TIMEOUT = timedelta(hours=6)


def _first_int(names, default: int) -> int:
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return default


def launched_processes() -> int:
    """How many processes the launcher started (1 for a plain run), read from its environment alone."""
    return _first_int(_WORLD_SIZE, 1)


@dataclass(frozen=True)
class Processes:
    """This process's place in a launch of several, and the collective steps kdcache needs.

    Every step goes through one collective, `gather`, so that a process that fails inside an agreed step (which
    gathers its error) always meets the others at the same kind of call. torch.distributed is called directly:
    the Trainer resets accelerate's PartialState when it starts, while the process group stays.
    """

    count: int
    index: int
    local_count: int
    device: "torch.device"

    def gather(self, value) -> list:
        """`value` from every process, in process order; a barrier as well."""
        import torch.distributed

        values = [None] * self.count
        try:
            torch.distributed.all_gather_object(values, value)
        except RuntimeError as error:  # a peer died: its own message (printed by it) says why
            failure = KdcacheError(
                f"another process stopped ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
            )
            failure.reported_elsewhere = True
            raise failure from None
        return values

    def share(self, value):
        """The main process's `value`, on every process."""
        return self.gather(value if is_main(self) else None)[0]

    def agree(self, error: "KdcacheError | None") -> None:
        """Raise the first process's error on every process (printed by the main one only), if any failed."""
        messages = [message for message in self.gather(None if error is None else str(error)) if message is not None]
        if messages:
            failure = error if error is not None and str(error) == messages[0] else KdcacheError(messages[0])
            failure.reported_elsewhere = not is_main(self)
            raise failure


def distributed(device: str = "auto") -> Processes | None:
    """The launch this process belongs to, its process group started through accelerate; None on a plain run.

    `device` is the --device option: CPU processes talk over gloo; CUDA processes over NCCL, and each uses the GPU
    of its local process index (`Processes.device`), whatever GPU index --device names.
    """
    count = launched_processes()
    if count <= 1:
        return None
    import atexit

    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or not torch.cuda.is_available()
    local_count, gpus = _first_int(_LOCAL_WORLD_SIZE, count), torch.cuda.device_count()
    if not cpu and local_count > gpus:
        # `accelerate launch --num_processes N` with fewer GPUs: NCCL puts two processes on one GPU and fails at the
        # first collective with 'invalid usage'. Said here, by every process alike, before any collective.
        failure = KdcacheError(
            f"the launcher started {local_count} processes on this machine, which has {gpus} GPU"
            f"{'' if gpus == 1 else 's'} (one process per GPU); launch --num_processes {gpus}, or give --device cpu "
            "for CPU processes"
        )
        failure.reported_elsewhere = _first_int(_LOCAL_RANK, 0) != 0  # the machine's first process says it
        raise failure
    if not torch.distributed.is_initialized():
        atexit.register(_end_process_group)  # see end_process
    state = PartialState(cpu=cpu, timeout=COLLECTIVE_TIMEOUT)
    if state.num_processes != count:
        raise KdcacheError(
            f"the launcher started {count} processes but --device {device} cannot be shared among them "
            "(a process group needs CPUs or CUDA GPUs); use --device cpu or cuda"
        )
    return Processes(
        count=state.num_processes,
        index=state.process_index,
        local_count=local_count,
        device=torch.device("cpu") if cpu else state.device,
    )


def _end_process_group() -> None:
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def end_process(status: int = 0) -> None:
    """End this process of a launch now, without the interpreter's teardown.

    A gloo worker thread can still hold the last collective's tensors when the interpreter tears down; freeing them
    then needs the GIL, and the process aborts (SIGABRT, "terminate called without an active exception") after its
    work is done, failing the launch (pytorch/pytorch#190489). On a loaded 2-core machine that was about 1 launch of
    kdcache teacher-logits in 10. Destroying the process group at exit (registered by `distributed`) made it 1 in 70,
    not 0: other holders (transformers' model loading) keep the group and its threads alive. Everything kdcache
    writes is closed and renamed when a stage returns, so its command line ends launched processes this way.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def is_main(processes: Processes | None = None) -> bool:
    """Whether this process does what a launch of several does once (checks, renames, what is printed): the first of
    `processes` (the launch as `distributed` returned it); without them, as the launcher's environment says (a plain
    run: yes), for the command line, which runs before a stage joins its launch and after it returns."""
    return (processes.index if processes is not None else _first_int(_RANK, 0)) == 0


@contextlib.contextmanager
def agreed(processes: Processes | None):
    """A step whose outcome all processes share: a KdcacheError raised in it by any process is raised by every
    process, and printed once (by the main one). Where only the main process acts (output checks, the final
    rename), the others learn of its error this way instead of waiting for it. On a plain run: just the step."""
    if processes is None:
        yield
        return
    failure = None
    try:
        yield
    except KdcacheError as error:
        failure = error
    processes.agree(failure)


def cpus_per_process(processes: Processes | None) -> int:
    """The CPU cores this process may count on: the machine's, shared among the processes launched on it."""
    return max(1, (os.cpu_count() or 1) // (processes.local_count if processes else 1))
