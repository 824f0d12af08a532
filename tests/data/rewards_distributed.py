"""Run by tests/test_rewards_timebounds.py under `torchrun --nproc_per_node 2`: every rank scores pathological
answers with the accuracy reward, checks each returns 0 in under 2 s, then takes a real DDP step (gloo) to show
the step continues. Prints one JSON line per rank."""

import json
import os
import sys
import time

import torch
from accelerate import Accelerator

import rewards

PATHOLOGICAL = ["9^{9^{9^{9}}}", "(10^{10^{10}})!", "\\sqrt{" * 300 + "2" + "}" * 300, "2^{2^{30}}",
                "1+" * 50_000 + "1"]


def main() -> None:
    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2, acc.num_processes
    accuracy = rewards.get("accuracy")
    assert accuracy(["<answer>0.5</answer>"], None, answer=["\\frac{1}{2}"]) == [1.0]  # start this rank's pool
    walls, scores = [], []
    for k, p in enumerate(PATHOLOGICAL):
        p = p if acc.process_index == 0 else p.replace("9", "8")  # ranks differ
        t0 = time.monotonic()
        s = accuracy([f"<think>x</think><answer>{p}</answer>", f"<think>x</think><answer>{k}</answer>"], None,
                     answer=["5", str(k)], max_answer_chars=None)  # no length cap: the deadline must hold
        walls.append(time.monotonic() - t0)
        scores.append(s)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    reward = torch.tensor([sum(s[1] for s in scores)])
    loss = (model(torch.ones(2, 4)).sum() - reward).pow(2)
    acc.backward(loss)
    opt.step()
    total = acc.gather(reward).sum().item()
    line = json.dumps({"rank": acc.process_index, "n": acc.num_processes, "walls": walls, "scores": scores,
                       "gathered": total}) + "\n"
    os.write(1, line.encode())  # one write of < PIPE_BUF bytes: the two ranks' lines cannot interleave on the pipe
    acc.wait_for_everyone()
    sys.exit(0)


if __name__ == "__main__":
    main()
