"""Run-level services: what the commands share, each for one concern, taking config sections or
plain values.

  checkpoint.py       checkpoints (the one atomic write), run directories, what a resume may change, metadata
  loaded_model.py     a saved run, checkpoint or bundle, loaded for use
  offload.py          experts left in the checkpoint file, read in behind a cache of K per layer
  warmstart.py        train.init_from (fine-tuning, upcycling a dense model) and train.freeze
  hf.py               the moectl <-> transformers mapping (Mixtral, Qwen2-MoE)
  tracking.py         TensorBoard, and every tag's name
  distributed.py      process groups, DDP, how a global batch splits over processes
  expert_parallel.py  experts sharded over processes, tokens exchanged by all-to-all, FasterMoE shadowing
"""
