# Shared helpers: the run grid the params define, and the raw-result paths (mow/runs.py).


def atari_protocols():
    return [name for name, proto in P["protocols"].items() if proto["suite"] == "atari"]


def raw_result(suite, protocol, method, variant, task, seed):
    return f"results/raw/{SCALE}/{suite}/{protocol}/{method}/{variant}/{task}/seed{seed}.json"


def storm_results():
    return [raw_result("atari", protocol, "storm", "full", game, seed)
            for protocol in atari_protocols()
            for game in P["suites"]["atari"]["tasks"]
            for seed in P["seeds"]]


# Per-job resources of a training run, by scale. runtime is in minutes, mem_mb in MB, gpu
# a count (the SLURM executor turns it into --gpus=N; 0 requests none). smoke: minutes on
# 2 CPU cores; paper: one GPU for a 102k-step run (raise runtime for a slow GPU).
TRAIN_RESOURCES = (dict(mem_mb=4000, runtime=30, gpu=0) if SCALE == "smoke"
                   else dict(mem_mb=32000, runtime=600, gpu=1))
