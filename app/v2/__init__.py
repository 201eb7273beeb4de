"""The Open Inference Protocol v2 (KServe / Triton REST): wire codec and protocol documents."""
