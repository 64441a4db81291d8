"""The PMPI interposition library (tools/pmpi) under real mpiexec runs.

Builds the library with tools/pmpi/build.sh once per session, runs small MPI
programs with it LD_PRELOADed and checks the per-rank JSON reports against the
exact traffic the programs generate. Every subprocess runs under a hard timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mpisplit import launch, pmpi

ROOT = Path(__file__).resolve().parent.parent
BUILD_SH = ROOT / "tools" / "pmpi" / "build.sh"
TIMEOUT_S = 60

pytestmark = pytest.mark.timeout(300)


# --------------------------------------------------------------------------- helpers


def _run(cmd: list[str], *, env=None, cwd=None, timeout: float = TIMEOUT_S):
    """subprocess.run with a hard timeout that also kills the process group."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {cmd}\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="session")
def pmpi_lib() -> Path:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed: cannot build tools/pmpi")
    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler (cc/gcc/clang) on PATH: cannot build tools/pmpi")
    env = dict(os.environ, PYTHON=sys.executable)
    res = _run(["bash", str(BUILD_SH)], env=env, timeout=300)
    assert res.returncode == 0, f"build.sh failed:\n{res.stdout}\n{res.stderr}"
    lib = Path(res.stdout.strip().splitlines()[-1])
    assert lib.is_file() and lib.name == pmpi.LIBRARY_NAME
    return lib


def _mpirun(
    lib: Path, n: int, argv: list[str], out_dir: Path, cwd: Path, *, finalized: bool = True
):
    """Runs ``argv`` on ``n`` ranks with the library preloaded; it must succeed. Without
    ``finalized`` the ranks exit without ``MPI_Finalize``, which Open MPI's launcher reports
    (exit status 1 and a message saying so) and MPICH's does not."""
    launcher = launch.find("mpiexec")
    env = pmpi.preload_env(
        out_dir, base=launcher.environment(dict(os.environ, **{pmpi.ENV_LIB: str(lib)}))
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = ["timeout", "-k", "5", str(TIMEOUT_S - 5)] if shutil.which("timeout") else []
    cmd += launcher.command(n, argv)
    res = _run(cmd, env=env, cwd=cwd)
    failed = f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    if not finalized and launcher.flavor == "openmpi":
        assert res.returncode == 1 and "finalize" in res.stderr.lower(), failed
    else:
        assert res.returncode == 0, failed
    return res


def _run_py(lib: Path, n: int, source: str, tmp_path: Path) -> list[dict]:
    prog = tmp_path / "prog.py"
    prog.write_text(textwrap.dedent(source))
    out = tmp_path / "pmpi"
    _mpirun(lib, n, [sys.executable, str(prog)], out, tmp_path)
    reports = pmpi.read_reports(out)
    assert [r["rank"] for r in reports] == list(range(n)), sorted(os.listdir(out))
    for r in reports:
        assert r["size"] == n
        assert r["finalized"] is True
        assert r["format"] == "mpisplit-pmpi/1"
        assert r["wall_s"] > 0
    return reports


def _counts(report: dict) -> dict[str, tuple[int, int]]:
    """{call: (count, bytes)} with large-count _c variants folded in."""
    return {k: (int(v["count"]), int(v["bytes"])) for k, v in pmpi.merged_calls(report).items()}


def _peers(report: dict) -> dict[int, tuple[int, int, int, int]]:
    return {
        int(p): (v["sent_messages"], v["sent_bytes"], v["recv_messages"], v["recv_bytes"])
        for p, v in report["peers"].items()
    }


# --------------------------------------------------------------------------- tests

BASIC = """
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    assert comm.Get_size() == 2
    if rank == 0:
        comm.Send(np.arange(1000, dtype=np.uint8), dest=1, tag=1)      # 1000 B blocking
        comm.Isend(np.ones(25, dtype=np.float64), dest=1, tag=2).Wait()  # 200 B
        comm.Send(np.ones(7, dtype=np.int32), dest=1, tag=3)           # 28 B, Mprobe'd
    else:
        # receive buffers larger than the messages: bytes must come from the status
        comm.Recv(np.empty(4096, np.uint8), source=0, tag=1)
        comm.Irecv(np.empty(100, np.float64), source=0, tag=2).Wait()
        msg = comm.Mprobe(source=MPI.ANY_SOURCE, tag=3)
        buf = np.empty(7, np.int32)
        msg.Recv(buf)
        assert buf.sum() == 7
    b = np.zeros(64, np.uint8)
    comm.Bcast(b, root=0)                                              # 64 B
    x = np.ones(16, np.float64)
    y = np.empty_like(x)
    comm.Allreduce(x, y, op=MPI.SUM)                                   # 128 B
    assert y[0] == 2.0
"""


def test_two_ranks_exact_counts(pmpi_lib, tmp_path):
    r0, r1 = _run_py(pmpi_lib, 2, BASIC, tmp_path)

    assert _counts(r0) == {
        "MPI_Send": (2, 1028),
        "MPI_Isend": (1, 200),
        "MPI_Wait": (1, 0),
        "MPI_Bcast": (1, 64),
        "MPI_Allreduce": (1, 128),
    }
    assert _peers(r0) == {1: (3, 1228, 0, 0)}

    assert _counts(r1) == {
        "MPI_Recv": (1, 1000),
        "MPI_Irecv": (1, 200),  # attributed at MPI_Wait completion
        "MPI_Wait": (1, 0),
        "MPI_Mprobe": (1, 0),
        "MPI_Mrecv": (1, 28),
        "MPI_Bcast": (1, 64),
        "MPI_Allreduce": (1, 128),
    }
    assert _peers(r1) == {0: (0, 0, 3, 1228)}

    for r in (r0, r1):
        for name, st in r["calls"].items():
            assert st["time_s"] >= 0.0, name
        # mpi4py 4 on an MPI-4 library uses the large-count entry points; either
        # way the exact names are reported as called.
        assert any(k in r["calls"] for k in ("MPI_Bcast", "MPI_Bcast_c"))


EXTENDED = """
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    other = 1 - rank
    B = lambda n: np.zeros(n, np.uint8)

    if rank == 0:
        p = comm.Send_init(np.ones(10, np.float32), dest=1, tag=10)   # 40 B per start
        for _ in range(3):
            p.Start()
            p.Wait()
        MPI.Prequest.Startall([p])
        p.Wait()
        p.Free()
        comm.Ssend(B(12), dest=1, tag=11)
        reqs = [comm.Isend(B(8), dest=1, tag=12), comm.Isend(B(16), dest=1, tag=13)]
        MPI.Request.Waitall(reqs)
        r = B(44)
        comm.Sendrecv(B(33), dest=1, sendtag=14, recvbuf=r, source=1, recvtag=14)
        comm.Isend(B(5), dest=1, tag=15).Wait()
        comm.Isendrecv(B(6), dest=1, sendtag=16, recvbuf=B(9), source=1, recvtag=16).Wait()
        comm.Send(B(3), dest=1, tag=17)
        comm.Send(B(2), dest=1, tag=18)
        comm.Send(B(0), dest=MPI.PROC_NULL, tag=19)                  # counted, no peer
    else:
        q = comm.Recv_init(B(100), source=0, tag=10)
        for _ in range(3):
            q.Start()
            q.Wait()
        MPI.Prequest.Startall([q])
        q.Wait()
        q.Wait()                                       # inactive: must not count again
        q.Free()
        comm.Recv(B(12), source=0, tag=11)
        reqs = [comm.Irecv(B(64), source=0, tag=12),
                comm.Irecv(B(64), source=MPI.ANY_SOURCE, tag=13)]
        MPI.Request.Waitall(reqs)                      # MPI_STATUSES_IGNORE path
        comm.Sendrecv(B(44), dest=0, sendtag=14, recvbuf=B(64), source=0, recvtag=14)
        while (m := comm.Improbe(source=MPI.ANY_SOURCE, tag=15)) is None:
            pass
        m.Irecv(B(5)).Wait()
        # Isendrecv receives are counted with their posted size (MPICH's status
        # for it is unreliable), so the buffer matches the message exactly
        comm.Isendrecv(B(9), dest=0, sendtag=16, recvbuf=B(6), source=0, recvtag=16).Wait()
        t = comm.Irecv(B(64), source=MPI.ANY_SOURCE, tag=17)
        while not MPI.Request.Testsome([t]):            # [] until it completes
            pass
        w = comm.Irecv(B(64), source=0, tag=18)
        assert MPI.Request.Waitany([w]) == 0
        comm.Recv(B(4), source=MPI.PROC_NULL, tag=19)                # counted, no peer

    # collectives: bytes = what this rank hands in (see tools/pmpi/README.md)
    g = np.empty(8, np.int32) if rank == 0 else None
    comm.Gather(np.ones(4, np.int32), g, root=0)                         # 16 B each
    sv = [np.arange(3, dtype=np.int64), [1, 2], [0, 1], MPI.INT64_T] if rank == 0 else None
    comm.Scatterv(sv, np.empty(2, np.int64), root=0)                     # root: 24 B
    comm.Alltoall(np.ones(4, np.float64), np.empty(4, np.float64))      # 2*8*2 = 32 B
    comm.Allgather(np.ones(3, np.uint8), np.empty(6, np.uint8))         # 3 B
    comm.Reduce(np.ones(5, np.float32), np.empty(5, np.float32) if rank == 0 else None,
                root=0)                                                  # 20 B
    comm.Ibarrier().Wait()
    comm.Barrier()
"""


def test_two_ranks_extended_paths(pmpi_lib, tmp_path):
    """Persistent, Waitall/Testsome/Waitany, Sendrecv, Isendrecv, Improbe/Imrecv,
    PROC_NULL and collective byte accounting."""
    r0, r1 = _run_py(pmpi_lib, 2, EXTENDED, tmp_path)

    sent0 = 4 * 40 + 12 + 8 + 16 + 33 + 5 + 6 + 3 + 2
    assert _peers(r0) == {1: (12, sent0, 2, 44 + 9)}
    assert _peers(r1) == {0: (2, 44 + 9, 12, sent0)}

    c0, c1 = _counts(r0), _counts(r1)
    assert c0 == {
        "MPI_Send_init": (1, 160),
        "MPI_Start": (3, 0),
        "MPI_Startall": (1, 0),
        "MPI_Request_free": (1, 0),
        "MPI_Ssend": (1, 12),
        "MPI_Isend": (3, 8 + 16 + 5),
        "MPI_Waitall": (1, 0),
        "MPI_Sendrecv": (1, 33 + 44),
        "MPI_Isendrecv": (1, 6 + 9),
        "MPI_Wait": (4 + 1 + 1 + 1, 0),  # persistent x4, Isend, Isendrecv, Ibarrier
        "MPI_Send": (3, 3 + 2 + 0),
        "MPI_Gather": (1, 16),
        "MPI_Scatterv": (1, 24),
        "MPI_Alltoall": (1, 32),
        "MPI_Allgather": (1, 3),
        "MPI_Reduce": (1, 20),
        "MPI_Ibarrier": (1, 0),
        "MPI_Barrier": (1, 0),
    }
    assert c1 == {
        "MPI_Recv_init": (1, 160),
        "MPI_Start": (3, 0),
        "MPI_Startall": (1, 0),
        "MPI_Request_free": (1, 0),
        "MPI_Recv": (2, 12),
        "MPI_Irecv": (4, 8 + 16 + 3 + 2),
        "MPI_Waitall": (1, 0),
        "MPI_Sendrecv": (1, 44 + 33),
        "MPI_Improbe": (c1["MPI_Improbe"][0], 0),  # polled: any number >= 1
        "MPI_Imrecv": (1, 5),
        "MPI_Isendrecv": (1, 9 + 6),
        # persistent x5 (one on an inactive request), Imrecv, Isendrecv, Ibarrier
        "MPI_Wait": (5 + 1 + 1 + 1, 0),
        "MPI_Testsome": (c1["MPI_Testsome"][0], 0),
        "MPI_Waitany": (1, 0),
        "MPI_Gather": (1, 16),
        "MPI_Scatterv": (1, 0),
        "MPI_Alltoall": (1, 32),
        "MPI_Allgather": (1, 3),
        "MPI_Reduce": (1, 20),
        "MPI_Ibarrier": (1, 0),
        "MPI_Barrier": (1, 0),
    }
    assert c1["MPI_Improbe"][0] >= 1 and c1["MPI_Testsome"][0] >= 1


SUBCOMM = """
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    assert comm.Get_size() == 3
    # color 0 = world {0, 2}, ordered by key = -rank: sub rank 0 is world 2,
    # sub rank 1 is world 0.  World 1 is alone in color 1.
    sub = comm.Split(color=rank % 2, key=-rank)
    if rank == 2:
        assert sub.Get_rank() == 0
        sub.Send(np.ones(300, np.uint8), dest=1, tag=1)
        sub.Recv(np.empty(64, np.uint8), source=1, tag=2)
    elif rank == 0:
        assert sub.Get_rank() == 1
        sub.Irecv(np.empty(512, np.uint8), source=MPI.ANY_SOURCE, tag=1).Wait()
        sub.Send(np.ones(50, np.uint8), dest=0, tag=2)
        comm.Recv(np.empty(64, np.uint8), source=MPI.ANY_SOURCE, tag=3)
    else:
        comm.Send(np.ones(11, np.uint8), dest=0, tag=3)
    sub.Bcast(np.zeros(5, np.uint8), root=0)
    sub.Free()
    # A new communicator (MPI may reuse the freed handle) with natural order:
    # the translation cache must not serve the old table.
    sub2 = comm.Split(color=0, key=rank)
    if rank == 0:
        sub2.Send(np.ones(7, np.uint8), dest=2, tag=4)
    elif rank == 2:
        m = sub2.Mprobe(source=MPI.ANY_SOURCE, tag=4)
        m.Recv(np.empty(7, np.uint8))
    sub2.Barrier()
    sub2.Free()
"""


def test_three_ranks_subcommunicator_translation(pmpi_lib, tmp_path):
    r0, r1, r2 = _run_py(pmpi_lib, 3, SUBCOMM, tmp_path)
    assert _peers(r0) == {2: (2, 57, 1, 300), 1: (0, 0, 1, 11)}
    assert _peers(r1) == {0: (1, 11, 0, 0)}
    assert _peers(r2) == {0: (1, 300, 2, 57)}

    c0, c1, c2 = _counts(r0), _counts(r1), _counts(r2)
    assert c0["MPI_Irecv"] == (1, 300)
    assert c0["MPI_Send"] == (2, 57)
    assert c0["MPI_Recv"] == (1, 11)
    assert c1["MPI_Send"] == (1, 11)
    assert c2["MPI_Send"] == (1, 300)
    assert c2["MPI_Recv"] == (1, 50)
    assert c2["MPI_Mrecv"] == (1, 7)
    for c in (c0, c1, c2):
        assert c["MPI_Bcast"] == (1, 5)
        assert c["MPI_Barrier"] == (1, 0)


PEER_TIME = """
    import time
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    comm.Barrier()
    if rank == 1:   # blocked ~0.3 s on rank 0, then ~0.3 s on rank 2
        comm.Recv(np.empty(8, np.uint8), source=0, tag=1)
        comm.Irecv(np.empty(8, np.uint8), source=MPI.ANY_SOURCE, tag=2).Wait()
    else:
        time.sleep(0.3 if rank == 0 else 0.6)
        comm.Send(np.ones(8, np.uint8), dest=1, tag=1 if rank == 0 else 2)
"""


def test_per_peer_time(pmpi_lib, tmp_path):
    """A peer's time is the time in the calls that moved its messages: the blocking Recv
    waits for rank 0, the Wait completing the any-source Irecv waits for rank 2."""
    r0, r1, r2 = _run_py(pmpi_lib, 3, PEER_TIME, tmp_path)
    waited = {int(p): v["time_s"] for p, v in r1["peers"].items()}
    assert sorted(waited) == [0, 2]
    assert 0.25 < waited[0] < 0.5 and 0.25 < waited[2] < 0.5, waited
    for sender in (r0, r2):  # an 8-byte eager send does not wait for the receiver
        assert 0 <= sender["peers"]["1"]["time_s"] < 0.1


THREADS = """
    import threading
    import numpy as np
    from mpi4py import MPI

    assert MPI.Query_thread() == MPI.THREAD_MULTIPLE
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    T, N = 4, 250

    def work(t):
        for i in range(N):
            n = 1 + (i % 7)
            if rank == 0:
                if i % 2:
                    comm.Send(np.zeros(n, np.uint8), dest=1, tag=t)
                else:
                    comm.Isend(np.zeros(n, np.uint8), dest=1, tag=t).Wait()
            else:
                buf = np.empty(16, np.uint8)
                if i % 2:
                    comm.Recv(buf, source=0, tag=t)
                else:
                    comm.Irecv(buf, source=MPI.ANY_SOURCE, tag=t).Wait()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(T)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
"""


def test_threads_concurrent_counts(pmpi_lib, tmp_path):
    """MPI_THREAD_MULTIPLE: 4 threads per rank; no update may be lost (a completed request's
    handle, reused by another thread's receive before the completing thread recorded it,
    once lost a count in ~1000: the library now records completions from the entry as it
    stood before the call)."""
    T, N = 4, 250
    per_thread = sum(1 + (i % 7) for i in range(N))
    r0, r1 = _run_py(pmpi_lib, 2, THREADS, tmp_path)
    assert _peers(r0) == {1: (T * N, T * per_thread, 0, 0)}
    assert _peers(r1) == {0: (0, 0, T * N, T * per_thread)}
    c0, c1 = _counts(r0), _counts(r1)
    assert c0["MPI_Send"][0] + c0["MPI_Isend"][0] == T * N
    assert c0["MPI_Wait"][0] == c0["MPI_Isend"][0] == T * N // 2
    assert c1["MPI_Recv"][1] + c1["MPI_Irecv"][1] == T * per_thread
    assert c1["MPI_Wait"][0] == c1["MPI_Irecv"][0] == T * N // 2


C_PROGRAM = r"""
#include <mpi.h>
#include <string.h>
/* Classic (non-large-count) entry points, as a C/C++/Fortran-free program calls them. */
int main(int argc, char **argv)
{
    char buf[256];
    int rank, size;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    memset(buf, 1, sizeof buf);
    if (rank == 0) {
        double d[10] = {0};
        MPI_Request rq[2];
        MPI_Send(d, 10, MPI_DOUBLE, 1, 1, MPI_COMM_WORLD);                /* 80 B */
        MPI_Isend(buf, 17, MPI_CHAR, 1, 2, MPI_COMM_WORLD, &rq[0]);       /* 17 B */
        MPI_Isend(buf, 3, MPI_INT, 1, 3, MPI_COMM_WORLD, &rq[1]);         /* 12 B */
        MPI_Waitall(2, rq, MPI_STATUSES_IGNORE);
    } else if (rank == 1) {
        MPI_Request rq[2];
        MPI_Status st[2];
        int idx;
        MPI_Recv(buf, 32, MPI_DOUBLE, MPI_ANY_SOURCE, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        MPI_Irecv(buf, 100, MPI_CHAR, 0, 2, MPI_COMM_WORLD, &rq[0]);
        MPI_Irecv(buf + 128, 10, MPI_INT, MPI_ANY_SOURCE, 3, MPI_COMM_WORLD, &rq[1]);
        MPI_Waitany(2, rq, &idx, &st[0]);
        MPI_Wait(&rq[1 - idx], &st[1]);
    }
    MPI_Allreduce(MPI_IN_PLACE, buf, 4, MPI_INT, MPI_MAX, MPI_COMM_WORLD); /* 16 B */
    MPI_Finalize();
    return 0;
}
"""


def _mpicc_from_build(lib: Path) -> str | None:
    cache = lib.parent / "CMakeCache.txt"
    if cache.is_file():
        for line in cache.read_text().splitlines():
            if line.startswith("MPI_C_COMPILER:"):
                return line.split("=", 1)[1]
    return None


def test_c_program_classic_symbols(pmpi_lib, tmp_path):
    mpicc = _mpicc_from_build(pmpi_lib)
    if not mpicc or not Path(mpicc).is_file():
        pytest.skip("MPI C compiler wrapper of the build not found")
    src = tmp_path / "prog.c"
    src.write_text(C_PROGRAM)
    exe = tmp_path / "prog"
    res = _run([mpicc, "-O1", "-o", str(exe), str(src)], timeout=TIMEOUT_S)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "pmpi"
    _mpirun(pmpi_lib, 2, [str(exe)], out, tmp_path)
    r0, r1 = pmpi.read_reports(out)
    # a C program calls the classic names, not the _c ones
    assert {k: (v["count"], v["bytes"]) for k, v in r0["calls"].items()} == {
        "MPI_Send": (1, 80),
        "MPI_Isend": (2, 29),
        "MPI_Waitall": (1, 0),
        "MPI_Allreduce": (1, 16),
    }
    assert {k: (v["count"], v["bytes"]) for k, v in r1["calls"].items()} == {
        "MPI_Recv": (1, 80),
        "MPI_Irecv": (2, 29),
        "MPI_Waitany": (1, 0),
        "MPI_Wait": (1, 0),
        "MPI_Allreduce": (1, 16),
    }
    assert _peers(r0) == {1: (3, 109, 0, 0)}
    assert _peers(r1) == {0: (0, 0, 3, 109)}


NO_FINALIZE = """
    import mpi4py
    mpi4py.rc.finalize = False          # exit without MPI_Finalize
    import numpy as np
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    comm.Sendrecv(np.ones(9, np.uint8), dest=0, recvbuf=np.empty(9, np.uint8), source=0)
"""


def test_exit_without_finalize_and_non_mpi_process(pmpi_lib, tmp_path):
    prog = tmp_path / "prog.py"
    prog.write_text(textwrap.dedent(NO_FINALIZE))
    out = tmp_path / "pmpi"
    _mpirun(pmpi_lib, 1, [sys.executable, str(prog)], out, tmp_path, finalized=False)
    (r,) = pmpi.read_reports(out)
    assert r["finalized"] is False
    assert _counts(r)["MPI_Sendrecv"] == (1, 18)
    assert _peers(r) == {0: (1, 9, 1, 9)}

    # a process that never initializes MPI: runs normally, writes nothing
    out2 = tmp_path / "none"
    env = pmpi.preload_env(out2, base=dict(os.environ, **{pmpi.ENV_LIB: str(pmpi_lib)}))
    res = _run([sys.executable, "-c", "print('ok')"], env=env)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    assert pmpi.read_reports(out2) == []


def test_helpers(tmp_path, monkeypatch):
    (tmp_path / "pmpi-rank1.json").write_text(json.dumps({"rank": 1, "calls": {}}))
    (tmp_path / "pmpi-rank0.json").write_text(
        json.dumps(
            {
                "rank": 0,
                "calls": {
                    "MPI_Send": {"count": 1, "bytes": 4, "time_s": 0.5},
                    "MPI_Send_c": {"count": 2, "bytes": 6, "time_s": 0.25},
                },
            }
        )
    )
    (tmp_path / "other.json").write_text("{}")
    reports = pmpi.read_reports(tmp_path)
    assert [r["rank"] for r in reports] == [0, 1]
    assert pmpi.merged_calls(reports[0]) == {"MPI_Send": {"count": 3, "bytes": 10, "time_s": 0.75}}
    assert pmpi.read_reports(tmp_path / "missing") == []

    fake = tmp_path / pmpi.LIBRARY_NAME
    fake.write_bytes(b"")
    monkeypatch.setenv(pmpi.ENV_LIB, str(fake))
    assert pmpi.library_path() == fake.resolve()
    monkeypatch.setenv(pmpi.ENV_LIB, str(tmp_path))  # a directory holding it
    assert pmpi.library_path() == fake.resolve()
    env = pmpi.preload_env(tmp_path / "out", base={"LD_PRELOAD": "/x.so"})
    assert env["LD_PRELOAD"] == f"{fake.resolve()}:/x.so"
    assert env[pmpi.ENV_DIR] == str((tmp_path / "out").resolve())
    monkeypatch.setenv(pmpi.ENV_LIB, str(tmp_path / "nope.so"))
    assert pmpi.library_path() is None
    with pytest.raises(FileNotFoundError):
        pmpi.preload_env(tmp_path / "out")
