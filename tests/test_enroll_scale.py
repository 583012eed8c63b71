"""Two `rtfq-serve` processes on one DIST_DIR: concurrent uploads (serialised by the file lock)
and downloads through both, every manifest whole, every body the file it names."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading

from rtfq_deploy import manifest as mf
from rtfq_deploy.enroll import EnrollConfig, enroll
from tests.fixtures.dist import request, wait_for
from tests.test_cli_serve import rtfq_serve
from tests.test_enroll import QUICK, TOKENS, exported, site  # noqa: F401  (fixtures)

DEVICES = [f"dev-{i}" for i in range(8)]


def test_two_server_processes_share_one_dist_dir(site):  # noqa: F811
    device_tokens = {d: f"tok-{d}-" + "9" * 16 for d in DEVICES}
    site["tokens"].write_text("".join(f"{d} {t}\n" for d, t in (TOKENS | device_tokens).items()))
    options = ["--candidates", str(site["candidates"]), "--accuracy", str(site["table"]), "--budget", "size=200KB",
               "--budget", "latency=100s", "--device-token-file", str(site["tokens"]), "--upload-interval", "0",
               "--poll", "0.1"]
    with contextlib.ExitStack() as stack:
        url_a, _ = stack.enter_context(rtfq_serve(str(site["dist"]), *options))
        url_b, _ = stack.enter_context(rtfq_serve(str(site["dist"]), *options))
        # one real enrollment gives a results file; every device uploads it as its own
        first = enroll(EnrollConfig(server=url_a, device="pi-a", cache_dir=site["root"] / "cache",
                                    token=TOKENS["pi-a"], measure=QUICK))
        body = first.results_path.read_bytes()
        candidates = {c["sha256"]: c for c in request(url_b, "/v1/candidates").json()["candidates"]}
        answers: dict[str, int] = {}
        bad: list[str] = []
        fetched = [0]
        stop = threading.Event()

        def upload(device: str, url: str) -> None:
            headers = {"Content-Length": str(len(body)), "Authorization": f"Bearer {device_tokens[device]}"}
            reply = request(url, f"/v1/devices/{device}/results", method="POST", body=body, headers=headers)
            answers[device] = reply.status
            if reply.status == 200:  # the answering server already serves the device's new entries
                served = request(url, f"/v1/devices/{device}").json()
                if {f["subnet"] for f in served["files"]} != {"r32-w0.50-q4", "r64-w1.00-q8"}:
                    bad.append(f"{device}: {served}")

        def download(url: str) -> None:
            while not stop.is_set():
                for sha, c in candidates.items():
                    reply = request(url, c["url"])
                    if reply.status != 200 or hashlib.sha256(reply.body).hexdigest() != sha:
                        bad.append(f"candidate {c['file']}: {reply.status}")
                    fetched[0] += 1
                text = (site["dist"] / mf.MANIFEST).read_text()
                mf.parse_manifest(json.loads(text))  # whole at every moment
                for name in json.loads(text)["devices"]:
                    resolved = request(url, f"/v1/devices/{name}/resolve?budget=size%3D200KB")
                    if resolved.status == 200:
                        entry = resolved.json()["entry"]
                        got = request(url, entry["url"])
                        if got.status == 200 and hashlib.sha256(got.body).hexdigest() != entry["sha256"]:
                            bad.append(f"{name}: a body that is not {entry['subnet']}")

        readers = [threading.Thread(target=download, args=(u,)) for u in (url_a, url_b)]
        writers = [threading.Thread(target=upload, args=(d, (url_a, url_b)[i % 2])) for i, d in enumerate(DEVICES)]
        for t in readers + writers:
            t.start()
        for t in writers:
            t.join(120)
        stop.set()
        for t in readers:
            t.join(60)
        assert bad == [] and answers == {d: 200 for d in DEVICES}, (bad, answers)
        assert fetched[0] >= 2 * len(candidates)  # both servers answered downloads during the uploads
        manifest = mf.read_manifest(site["dist"])
        assert sorted(manifest.devices) == sorted(["pi-a", *DEVICES])
        for d in DEVICES:
            assert {(e.subnet, tuple(e.budgets)) for e in manifest.devices[d].files} == {
                ("r32-w0.50-q4", ("size=0.2MB",)), ("r64-w1.00-q8", ("latency=100000ms",))}
        for url in (url_a, url_b):
            wait_for(lambda: len(request(url, "/v1/devices").json()["devices"]) == 9)
            assert request(url, "/v1/health").json()["excluded"] == []
