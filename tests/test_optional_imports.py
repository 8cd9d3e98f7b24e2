"""`import sharded_negcache` needs torch only: the optional extras are blocked in a fresh interpreter."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCK = textwrap.dedent('''
    import importlib.abc, sys
    BLOCKED = {"torchrec", "fbgemm_gpu", "transformers", "sentence_transformers", "triton", "tensorboard",
               "datasets", "accelerate", "tokenizers", "matplotlib"}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
''')


def run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=240, env=env, cwd=str(ROOT))


def test_core_imports_and_runs_a_step_with_torch_only():
    """Also int8 storage (pure-torch codec) and a jagged field in list form; the integration fails clearly."""
    out = run('''
        import torch
        import sharded_negcache
        from sharded_negcache import FieldSpec, JaggedFieldSpec, ShardedCacheLossHandler
        import sharded_negcache.checkpoint, sharded_negcache.compat, sharded_negcache.integrations
        specs = {"emb": FieldSpec((4,), torch.float32), "tok": JaggedFieldSpec(5, torch.int64, format="list")}
        h = ShardedCacheLossHandler(specs, 8, "emb", ["tok"], score_transform=1.0, embedding_codec="int8")
        tower = lambda rows: torch.stack([t.float().mean().repeat(4) for t in rows["tok"]])
        for step in range(3):
            q = torch.randn(2, 4, requires_grad=True)
            d = torch.randn(2, 4, requires_grad=True)
            loss = h.update_cache_and_compute_loss(tower, q, d, {"tok": [torch.arange(3), torch.arange(2)]})
            loss.backward()
        assert h.steps_done == 3 and h.last_step.metrics["fill_fraction"] == 0.75
        blocked = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        assert not blocked, blocked
        try:  # the integration names its extra when the package is missing
            import sharded_negcache.integrations.sentence_transformers
        except ImportError as exc:
            print(exc)
        print("ok")
    ''')
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
    assert "pip install 'sharded_negcache[sentence-transformers]'" in out.stdout
