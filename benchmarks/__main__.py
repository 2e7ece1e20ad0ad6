from benchmarks.common import main

main()
