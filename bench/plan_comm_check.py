"""The planner's expert-parallel bytes per step (orchestrator/plan.py) against the bytes the real
DimShardedPEER layer counts (CommStats) for one micro-batch forward + backward on gloo ranks.

    python bench/plan_comm_check.py
"""
import sys, os
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT); sys.path.insert(0, os.path.join(ROOT, "bench"))
from launch import compose_train_config
from orchestrator.plan import plan
from peer_comm import measure
def main():
  for ep in (2, 4):
      cfg = compose_train_config(["model=peer", f"cluster.nproc_per_node={ep}", f"parallel.dp={ep}", f"parallel.ep={ep}"], check_fit=False)
      p = plan(cfg)
      tokens = cfg.trainer.micro_batch_size * cfg.data.seq_len
      counted = measure(ep, cfg.model.d_model, cfg.model.peer.num_heads * cfg.model.peer.top_k, tokens) * tokens
      print(f"| model=peer, dp=ep={ep}, {tokens} tokens per rank and step | {p.comm['ep']:,.0f} | {counted:,.0f} | {'equal' if abs(p.comm['ep'] - counted) < 0.5 else 'DIFFERENT'} |", flush=True)

if __name__ == '__main__':
    main()
