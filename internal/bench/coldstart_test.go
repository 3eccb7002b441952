package bench

const coldChildEnv = "BENCH_COLDSTART_CHILD"

func coldChild() int { return 0 }
