"""Peak host memory of one rank's start-up on a release-shaped SD3.5 folder (run by tests/test_memory_table.py
in a fresh process, so nothing else has touched the heap):

    python tests/memory_probe.py FOLDER OUT.json

Loads what a training rank loads, on the CPU (where the "device" is host memory), phase by phase through the
functions the training loop calls: t2i.models.build.build_frozen (CLIP-L, bigG, T5, VAE) and build_for (the
transformer from model.pretrained). A thread samples the process's anonymous RSS (RssAnon: the heap, not the
safetensors pages that are mapped from the page cache and can be dropped) every millisecond. Written per
phase: that peak above the level before the phase, the bytes of the tensors the phase left held, and the
parameter counts and dtypes of what was built.
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler:
    """The largest RssAnon seen between start() and stop()."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()

    def __enter__(self):
        self.before = self.peak = rss_anon()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())


def held(module) -> tuple[int, int, list[str]]:
    tensors = list(module.parameters()) + list(module.buffers())
    return (sum(t.numel() * t.element_size() for t in tensors), sum(p.numel() for p in module.parameters()),
            sorted({str(p.dtype) for p in module.parameters()}))


def main(folder: str, out: str) -> None:
    import torch

    from t2i.config import load_config
    from t2i.models.build import build_for, build_frozen

    torch.set_num_threads(1)
    cfg = load_config(REPO / "configs" / "sd3.5-medium-512.yaml",
                      [f"model.pretrained={folder}", f"text.sd3_folder={folder}", f"vae.path={folder}",
                       "data.resolution=64"])
    phases = {}
    with PeakSampler() as s:
        text, vae = build_frozen(cfg, "cpu")
    t_bytes, t_params, t_dtypes = held(text)
    v_bytes, v_params, v_dtypes = held(vae)
    phases["frozen"] = {"peak_delta": s.peak - s.before, "held": t_bytes + v_bytes,
                        "text_params": t_params, "text_dtypes": t_dtypes,
                        "vae_params": v_params, "vae_dtypes": v_dtypes}
    with PeakSampler() as s:
        model = build_for(cfg, text, vae)
    m_bytes, m_params, m_dtypes = held(model)
    phases["transformer"] = {"peak_delta": s.peak - s.before, "held": m_bytes, "params": m_params,
                             "dtypes": m_dtypes}
    Path(out).write_text(json.dumps(phases, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
