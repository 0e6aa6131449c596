# Shared helpers: the run grid the params define, and the raw-result paths (mow/runs.py).


def atari_protocols():
    return [name for name, proto in P["protocols"].items() if proto["suite"] == "atari"]


def raw_result(suite, protocol, method, variant, task, seed):
    return f"results/raw/{SCALE}/{suite}/{protocol}/{method}/{variant}/{task}/seed{seed}.json"
