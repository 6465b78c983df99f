CU=/work/main/.venv/lib/python3.11/site-packages/nvidia/cu13; export KESTREL_NVCC=$CU/bin/nvcc LD_LIBRARY_PATH=$CU/lib KESTREL_REQUIRE_NVCC=1 KESTREL_REQUIRE_NVRTC=1
