"""Mixture-of-experts pieces the engine composes, none of them tied to a model name.

- experts.py: which modules hold a layer's routed experts (transformers' stacked-expert modules), and how
  many experts a config has;
- expert_parallel.py: experts split over the `ep` mesh dimension, tokens dispatched to their experts' ranks
  and combined back with all-to-all (dropless);
- router.py: the routers' auxiliary losses (load balancing, z-loss), per-layer expert load, and
  auxiliary-loss-free bias balancing, added to the training loss by the step.
"""
