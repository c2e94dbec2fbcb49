"""``glideserve cluster up`` / ``down`` as a user runs them: down drains the requests already admitted."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytest.importorskip("ray.serve")

from live_server import free_port  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]


def test_up_serves_and_down_drains_then_stops(tmp_path):
    port = free_port()
    config = tmp_path / "cluster.yaml"
    config.write_text(f"port: {port}\nmodels:\n  - name: glide-tiny\n    engine: {{profile: false}}\n"
                      "ray: {num_cpus: 2}\n")
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    up = subprocess.Popen([sys.executable, "-m", "glideserve", "cluster", "up", "--config", str(config)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        ready_line = next(line for line in up.stdout if line.startswith("glideserve cluster:"))
        assert f"at http://127.0.0.1:{port}" in ready_line, ready_line
        output: list[str] = []  # keep reading: Ray forwards the replicas' logs to this pipe
        reader = threading.Thread(target=lambda: output.extend(up.stdout), daemon=True)
        reader.start()
        answers: list = []

        def send(i: int) -> None:
            answers.append(httpx.post(f"http://127.0.0.1:{port}/v1/images/generations",
                                      json={"prompt": "a red circle", "seed": i, "num_inference_steps": 100},
                                      timeout=300))

        senders = [threading.Thread(target=send, args=(i,)) for i in range(4)]
        for sender in senders:
            sender.start()
        time.sleep(1.0)  # admitted and running
        # No --run-dir: down finds the deployment `up` recorded for this user.
        down = subprocess.run([sys.executable, "-m", "glideserve", "cluster", "down"], capture_output=True,
                              text=True, env=env, timeout=300)
        assert down.returncode == 0, down.stderr
        for sender in senders:
            sender.join(300)
        assert [a.status_code for a in answers] == [200] * 4
        assert up.wait(60) == 0
        reader.join(30)
        assert "glideserve cluster: stopped\n" in output
    finally:
        if up.poll() is None:
            up.kill()
