"""Server mode: `r1 serve MODEL` runs a vLLM engine in its own process (other devices or hosts), and the trainer
drives it through `VLLMServerWorker`, a RolloutWorker client.

Control messages are newline-delimited JSON over one TCP connection (prompts, sampling params, completions; no
pickle on the wire). Weights travel over torch.distributed: a group of the trainer (rank 0) and the server's
processes (rank 1, or 1..N with `--tensor-parallel-size N`; gloo on CPU, NCCL on GPU) built from a TCPStore that the
server hosts on port+1, outside the trainer's own default process group. Each bucket is one flat tensor: the client sends its names/shapes as JSON, then broadcasts it; the
server unflattens it straight into the engine's in-place reload, so a sync is one pass with bounded memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import select
import socket
import sys
import time

import torch
import torch.distributed as dist

from grpo.rollout.base import Completion, SamplingParams
from grpo.rollout.vllm import RolloutEngineError, buckets, sync_tensors, unfuse_experts

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RolloutServerError(RuntimeError):
    """The rollout server is unreachable, died, or timed out."""


def send(sock: socket.socket, msg: dict) -> None:
    sock.sendall(json.dumps(msg).encode() + b"\n")


def recv(f) -> dict | None:
    """One JSON message from a socket's file object, or None when the peer closed the connection."""
    line = f.readline()
    return json.loads(line) if line else None


def weight_group(host: str, port: int, rank: int, backend: str, timeout_s: float, world: int = 2):
    """A private process group (rank 0 trainer, ranks 1.. the server's processes) that leaves the default group
    alone."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world, is_master=rank == 1, timeout=timeout, wait_for_workers=False)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return store, dist.ProcessGroupGloo(store, rank, world, opts)
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    return store, dist.ProcessGroupNCCL(store, rank, world, opts)


def broadcast(pg, t: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = 0, 0
    pg.broadcast([t], opts).wait()


class Lines:
    """Newline-delimited JSON messages from a socket. While none arrives for `idle_s` seconds, `idle()` runs: the
    leader's heartbeat to its other ranks, so a trainer that trains for an hour between calls times nothing out."""

    def __init__(self, sock: socket.socket, idle_s: float | None = None, idle=None):
        self.sock, self.idle_s, self.idle, self.buf = sock, idle_s, idle, bytearray()

    def readline(self) -> dict | None:
        """The next message, or None when the peer closed the connection."""
        while (end := self.buf.find(b"\n")) < 0:
            if self.idle is not None and not select.select([self.sock], [], [], self.idle_s)[0]:
                self.idle()
                continue
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return None
            self.buf += chunk
        line = bytes(self.buf[:end])
        del self.buf[:end + 1]
        return json.loads(line)


# ---- server ---------------------------------------------------------------------------------------------------
class Server:
    """Serves one trainer connection at a time on a VLLMWorker living in this process. With tensor parallelism the
    server is N processes (torchrun), one engine shard each: rank 0, the leader, holds the trainer's connection
    and relays every message to the others over `group` (gloo), so all N run the same commands on the same
    requests, as vLLM's external launcher needs; only the leader replies. Every rank joins the weight broadcast."""

    def __init__(self, worker, host: str, port: int, weight_timeout_s: float, group=None, heartbeat_s: float = 60.0):
        self.worker, self.host, self.port, self.weight_timeout_s = worker, host, port, weight_timeout_s
        self.group, self.heartbeat_s = group, heartbeat_s
        self.rank = dist.get_rank(group) if group is not None else 0
        self.size = dist.get_world_size(group) if group is not None else 1
        self.pg = self.store = self.sock = self.lines = None
        self.device = "cpu"

    def relay(self, msg: dict | None) -> dict:
        """TP: the leader's message, on every rank (the others pass None)."""
        if self.group is None:
            return msg
        box = [msg]
        dist.broadcast_object_list(box, group_src=0, group=self.group)
        return box[0]

    def read(self) -> dict | None:
        """The trainer's next message on every rank (None: it disconnected); heartbeats are skipped."""
        while True:
            if self.rank == 0:
                msg = self.relay(self.lines.readline() or {"cmd": "disconnect"})
            else:
                msg = self.relay(None)
            if msg["cmd"] != "noop":
                return None if msg["cmd"] == "disconnect" else msg

    def reply(self, msg: dict) -> None:
        if self.rank == 0:
            send(self.sock, msg)

    def handle(self, msg: dict) -> dict | None:
        """Run one command; returns the reply's fields (None: already replied)."""
        cmd = msg["cmd"]
        w = self.worker
        if cmd == "ping":
            return {"model": w.model_path, "max_model_len": w.max_model_len, "tensor_parallel_size": self.size,
                    "dtype": str(w.dtype).removeprefix("torch.") if w.dtype is not None else None}
        if cmd == "generate":
            comps = w.generate(msg["prompt_ids"], msg["n"], SamplingParams(**msg["sampling"]))
            return {"completions": [dataclasses.asdict(c) for c in comps]}
        if cmd == "score":
            return {"logprobs": w.score(msg["sequences"], msg["starts"], msg.get("temperature", 1.0))}
        if cmd == "init_weights":
            self.reply({"ok": True})  # replied early: the client joins the group only after this
            self.store, self.pg = weight_group(self.host, self.port + 1, 1 + self.rank, msg["backend"],
                                               self.weight_timeout_s, world=1 + self.size)
            self.device = "cuda" if msg["backend"] == "nccl" else "cpu"
            return None
        if cmd == "update_weights":
            stream = self._receive()
            try:
                w.push_stream(stream)
            except Exception:
                for _ in stream:  # keep joining the client's broadcasts up to its `end`, so it gets the error now
                    pass
                raise
            return {"seconds": w.last_sync_s, "bytes": w.last_sync_bytes}
        if cmd in ("sleep", "wake"):
            getattr(w, cmd)()
            return {}
        raise ValueError(f"unknown command {cmd!r}")

    def _receive(self):
        """Yield (name, tensor) from broadcast buckets until the client's `end` message."""
        while True:
            msg = self.read()
            if msg is None or msg["cmd"] == "end":
                if msg is None:
                    raise RolloutServerError("trainer disconnected in the middle of a weight update")
                return
            flat = torch.empty(msg["numel"], dtype=DTYPES[msg["dtype"]], device=self.device)
            broadcast(self.pg, flat)
            offset = 0
            for name, shape in msg["entries"]:
                numel = int(torch.Size(shape).numel())
                yield name, flat[offset:offset + numel].view(shape)
                offset += numel

    def serve_forever(self) -> None:
        if self.rank > 0:  # the other TP ranks follow the leader's connections
            while self.serve_connection() != "shutdown":
                self.pg = self.store = None
            return
        heartbeat = None if self.group is None else (lambda: self.relay({"cmd": "noop"}))
        with socket.create_server((self.host, self.port)) as srv:
            print(f"r1 serve: listening on {self.host}:{self.port} (weights on port {self.port + 1})"
                  + (f", {self.size} tensor-parallel ranks" if self.size > 1 else ""), flush=True)
            srv.settimeout(self.heartbeat_s if heartbeat else None)
            while True:
                try:
                    sock, addr = srv.accept()
                except TimeoutError:  # no trainer yet: keep the other ranks' relay from timing out
                    heartbeat()
                    continue
                sock.settimeout(None)
                with sock:
                    self.sock, self.lines = sock, Lines(sock, self.heartbeat_s, heartbeat)
                    if self.serve_connection() == "shutdown":
                        return
                self.pg = self.store = None  # a new trainer builds a new weight group

    def serve_connection(self) -> str | None:
        while (msg := self.read()) is not None:
            if msg["cmd"] == "shutdown":
                self.reply({"ok": True})
                return "shutdown"
            try:
                out = self.handle(msg)
                if out is None:
                    continue
                reply = {"ok": True, **out}
            except ValueError as e:
                reply = {"ok": False, "kind": "request", "error": str(e)}
            except Exception as e:  # noqa: BLE001  (engine failures go back to the trainer with their message)
                reply = {"ok": False, "kind": "engine", "error": f"{type(e).__name__}: {e}"}
            self.reply(reply)
        return None


def main(argv: list[str]) -> int:
    """`r1 serve MODEL [--host H] [--port P] [--tensor-parallel-size N] ...`: start a vLLM engine (N > 1: N
    processes under torchrun, a shard each) and serve rollouts until killed."""
    ap = argparse.ArgumentParser(prog="r1 serve", description="Serve rollouts from a vLLM engine to an r1kit trainer.")
    ap.add_argument("model", help="HF checkpoint directory")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    ap.add_argument("--port", type=int, default=8765, help="control port; weights use port+1")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="shard the engine over N processes (GPUs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--truncate", choices=["error", "left"], default="error")
    ap.add_argument("--weight-timeout", type=float, default=300.0, help="seconds before a weight broadcast fails")
    ap.add_argument("--collective-timeout", type=float, default=1800.0,
                    help="seconds before the tensor-parallel ranks give up on their leader (it beats 4 times as often)")
    args = ap.parse_args(argv)
    tp = args.tensor_parallel_size
    if tp > 1 and "LOCAL_RANK" not in os.environ:  # one process per shard, as vLLM's external launcher runs them
        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                  str(tp), "-m", "grpo.rollout.server", *argv])
    from grpo.rollout.vllm import VLLMWorker, check_vllm

    group = None
    try:
        check_vllm()
        if tp > 1:
            world = int(os.environ.get("WORLD_SIZE", 1))
            if world != tp:
                raise ValueError(f"--tensor-parallel-size {tp} runs {tp} processes, torchrun started {world}")
            timeout = datetime.timedelta(seconds=args.collective_timeout)
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=timeout)
            group = dist.new_group(backend="gloo", timeout=timeout)  # the leader's relay to the other ranks
        worker = VLLMWorker(args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=args.seed,
                            gpu_memory_utilization=args.gpu_memory_utilization, truncate=args.truncate,
                            tensor_parallel_size=tp, tp_same_requests=True)
    except Exception as e:  # noqa: BLE001
        print(f"r1 serve: {e}", file=sys.stderr)
        return 1
    Server(worker, args.host, args.port, args.weight_timeout, group,
           heartbeat_s=max(1.0, args.collective_timeout / 4)).serve_forever()
    worker.close()
    return 0


# ---- client ---------------------------------------------------------------------------------------------------
class VLLMServerWorker:
    """RolloutWorker client of an `r1 serve` process: prompts over TCP, weights broadcast over torch.distributed."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8765, *, timeout: float = 600.0,
                 connect_timeout: float = 60.0, backend: str | None = None, bucket_mb: float = 256,
                 dtype: torch.dtype | None = None, weight_timeout: float = 300.0):
        self.host, self.port, self.timeout = host, port, timeout
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.bucket_bytes, self.dtype, self.weight_timeout = int(bucket_mb * 2**20), dtype, weight_timeout
        self.last_sync_s, self.last_sync_mb_s, self.last_sync_bytes = 0.0, 0.0, 0
        self.pg = self.store = None
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self.sock = socket.create_connection((host, port), timeout=5)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise RolloutServerError(f"no rollout server at {host}:{port} after {connect_timeout:.0f}s "
                                             f"({e}); start one with `r1 serve MODEL --port {port}`") from None
                time.sleep(0.5)
        self.sock.settimeout(timeout)
        self.f = self.sock.makefile("rb")
        self.info = self._call({"cmd": "ping"}, "connect")
        if self.dtype is None and self.info.get("dtype") in DTYPES:  # cast before the wire: bf16 halves it
            self.dtype = DTYPES[self.info["dtype"]]

    def _call(self, msg: dict, what: str) -> dict:
        """Send one request and wait for its reply; server death or silence becomes a RolloutServerError."""
        where = f"rollout server {self.host}:{self.port}"
        try:
            send(self.sock, msg)
            reply = recv(self.f)
        except socket.timeout:
            raise RolloutServerError(f"{where} did not answer {what} within {self.timeout:.0f}s") from None
        except OSError as e:
            raise RolloutServerError(f"{where} connection failed during {what}: {e} (did the server die?)") from None
        if reply is None:
            raise RolloutServerError(f"{where} closed the connection during {what} (did the server die? see its log)")
        if not reply.pop("ok"):
            if reply.get("kind") == "request":
                raise ValueError(f"{where}: {reply['error']}")
            raise RolloutEngineError(f"{where}: {reply['error']}")
        return reply

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> list[Completion]:
        reply = self._call({"cmd": "generate", "prompt_ids": [list(map(int, p)) for p in prompt_ids], "n": n,
                            "sampling": dataclasses.asdict(sampling)}, "generate")
        return [Completion(**c) for c in reply["completions"]]

    def score(self, sequences: list[list[int]], starts: list[int], temperature: float = 1.0) -> list[list[float]]:
        """Teacher-forced log_softmax(logits / T) of seq[j], j >= start, computed by the server's engine."""
        return self._call({"cmd": "score", "sequences": sequences, "starts": starts, "temperature": temperature},
                          "score")["logprobs"]

    def update_weights(self, named_tensors) -> None:
        """Broadcast the policy's weights bucket by bucket (one flat tensor each); times the sync."""
        named = unfuse_experts(sync_tensors(named_tensors))
        t0 = time.perf_counter()
        if self.pg is None:
            self._call({"cmd": "init_weights", "backend": self.backend}, "weight-group setup")
            self.store, self.pg = weight_group(self.host, self.port + 1, 0, self.backend, self.weight_timeout,
                                               world=1 + self.info.get("tensor_parallel_size", 1))
        device = "cuda" if self.backend == "nccl" else "cpu"
        nbytes = 0
        try:
            send(self.sock, {"cmd": "update_weights"})
            for bucket in buckets(named, self.bucket_bytes, self.dtype, device):
                flat = torch.cat([t.reshape(-1) for _, t in bucket])
                send(self.sock, {"cmd": "bucket", "dtype": str(flat.dtype).removeprefix("torch."),
                                 "numel": flat.numel(), "entries": [[name, list(t.shape)] for name, t in bucket]})
                broadcast(self.pg, flat)
                nbytes += flat.numel() * flat.element_size()
        except OSError as e:
            raise RolloutServerError(f"rollout server {self.host}:{self.port} failed during a weight update: "
                                     f"{e}") from None
        except RuntimeError as e:  # gloo/NCCL errors (peer gone, timeout)
            raise RolloutServerError(f"weight broadcast to {self.host}:{self.port + 1} failed: {e}") from None
        self._call({"cmd": "end"}, "weight update")
        self.last_sync_s = time.perf_counter() - t0
        self.last_sync_bytes = nbytes
        self.last_sync_mb_s = nbytes / 2**20 / max(self.last_sync_s, 1e-9)

    def sleep(self) -> None:
        self._call({"cmd": "sleep"}, "sleep")

    def wake(self) -> None:
        self._call({"cmd": "wake"}, "wake")

    def shutdown(self) -> None:
        """Ask the server process to exit."""
        self._call({"cmd": "shutdown"}, "shutdown")
        self.close()

    def close(self) -> None:
        self.pg = self.store = None
        try:
            self.f.close()
            self.sock.close()
        except OSError:
            pass


class SharedServer:
    """One `r1 serve` process for every torchrun rank of a trainer, as TRL's server mode: rank 0 holds the only
    connection; the ranks' requests travel to it (gloo object collectives on the default group) and each rank gets
    its own completions back. Under FSDP2 and ZeRO-3 every rank walks the weight stream (each tensor is gathered
    collectively); rank 0 broadcasts it to the server."""

    def __init__(self, client: VLLMServerWorker | None, world: int):
        self.client, self.world = client, world  # client: rank 0's connection, None on the other ranks
        self.last_sync_s, self.last_sync_mb_s, self.last_sync_bytes = 0.0, 0.0, 0

    def _on_rank0(self, fn, local=None, per_rank: bool = False):
        """Gather every rank's `local` to rank 0, run fn(list of them) there, and hand every rank its result (rank r
        the r-th item, per_rank); an error on rank 0 is raised on every rank with its message, so no rank waits on
        a collective alone."""
        parts = [None] * self.world
        dist.all_gather_object(parts, local)
        box = [None]
        if self.client is not None:
            try:
                box = [("ok", fn(parts))]
            except Exception as e:  # noqa: BLE001  (re-raised below, on every rank)
                box = [("error", (type(e), str(e)))]
        dist.broadcast_object_list(box, src=0)
        status, out = box[0]
        if status == "error":
            kind, msg = out
            raise (kind if issubclass(kind, (ValueError, RuntimeError)) else RolloutServerError)(msg)
        return out[dist.get_rank()] if per_rank else out

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> list[Completion]:
        """Each rank's prompts with its own sampling seed, one server call per rank (rank order)."""
        return self._on_rank0(lambda parts: [self.client.generate(*p) for p in parts], (prompt_ids, n, sampling),
                              per_rank=True)

    def update_weights(self, policy) -> None:
        if self.client is not None:
            self.client.update_weights(policy)
        elif _sharded(policy):  # the FSDP2 / ZeRO-3 gathers of rank 0's stream are collectives: join each of them
            for _ in sync_tensors(policy):
                pass
        self.last_sync_s, self.last_sync_mb_s, self.last_sync_bytes = self._on_rank0(
            lambda _: (self.client.last_sync_s, self.client.last_sync_mb_s, self.client.last_sync_bytes))

    def sleep(self) -> None:
        self._on_rank0(lambda _: self.client.sleep())

    def wake(self) -> None:
        self._on_rank0(lambda _: self.client.wake())

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def _sharded(policy) -> bool:
    """Whether `policy`'s weight stream gathers (FSDP2 DTensors, ZeRO-3 partitions); DDP's ranks hold it whole."""
    return isinstance(policy, torch.nn.Module) and any(hasattr(p, "full_tensor") or hasattr(p, "ds_id")
                                                       for p in policy.parameters())


def connect(cfg, world: int = 1, rank: int = 0):
    """The trainer's client of `cfg` (a VLLMServerConfig): the connection itself in one process, a SharedServer
    over torchrun ranks (only rank 0 connects)."""
    client = None
    if rank == 0:
        client = VLLMServerWorker(cfg.host, cfg.port, timeout=cfg.timeout_s, connect_timeout=cfg.connect_timeout_s,
                                  bucket_mb=cfg.bucket_mb, weight_timeout=cfg.weight_timeout_s)
    return client if world == 1 else SharedServer(client, world)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
