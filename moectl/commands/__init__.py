"""The commands: what `moectl <command>` runs, one module each. cli.py parses the command line,
loads the config and calls one function here; below this layer nothing holds the whole Config
(only the sections it needs), except a checkpoint's metadata.

  train.py        `moectl train`: the training loop (its parts are in moectl/training/)
  evaluate.py     the evaluation loop (training calls it too) and `moectl eval`
  route_stats.py  `moectl route-stats`: what each layer's routing does, with pictures
  generate.py     `moectl generate`: sampling, and chat with an instruction-tuned run
  export.py       `moectl export`: a safetensors bundle, or a transformers directory
  prune.py        `moectl prune`: fewer experts per MoE layer, chosen on calibration data (criteria: moe/prune.py)
  quantize.py     `moectl quantize`: weights stored in fewer bits by role (the scheme: common/quant.py)
  sweep.py        `moectl sweep`: a grid of runs over seeds, run one after another or side by side
  sweep_report.py its report: means with t-intervals, and arms against a baseline, paired by seed
  plan.py         `moectl plan`: a run's predicted step on other hardware and layouts
"""
