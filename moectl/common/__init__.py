"""The leaves: small modules every layer may use, which use nothing above them.

  runtime.py     device, autocast, the torchrun environment, threads and memory
  stats.py       perplexity, bits per byte, and the one list of routing-statistic columns
  paired.py      comparisons over seeds: means with t-intervals, paired differences, verdicts, curves
  errors.py      the error types the command line turns into one clear line
  console.py     progress bars, status lines, the end-of-run summary; Ctrl-C handling
  fileio.py      atomic writes of files and directories
  plots.py       matplotlib figures: load and co-selection heatmaps, error bars; PNG and RGB renderings
  quant.py       weight-only quantisation: int8 / int4 in groups with fp16 scales, packed for safetensors
  perf_model.py  FasterMoE's performance model of an expert-parallel layer (plain arithmetic)
  hub.py         Hugging Face Hub access that fails fast when the Hub cannot be reached
"""
