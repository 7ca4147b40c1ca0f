# A CUDA kernel image for jupyter-gpu-sessions, for hosts that can pull from a registry.
# (The default image is built offline by `jupyter gpu-sessions image build`; this one needs
# the CUDA base image from a registry.)
#
#   jupyter gpu-sessions image dockerfile > Dockerfile
#   docker build -t lab/cuda-python:12.4 --build-arg EXTRA_PACKAGES="torch" .
#   jupyter gpu-sessions kernelspec install --name python3-cuda --display-name "PyTorch (1 GPU)" \
#       --image lab/cuda-python:12.4 --gpus 1 --cpus 4 --memory 16GiB --sys-prefix
#
# The kernel runs as a non-root uid chosen by the provisioner (no USER needed) with
# HOME=/home/work; the kernelspec's argv is its command (no CMD needed). GPUs are attached
# by UUID through the NVIDIA container toolkit or CDI (see `jupyter gpu-sessions doctor`).
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG EXTRA_PACKAGES=""
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates procps \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m pip install "ipykernel>=7.1,<8" "ipywidgets>=8.1,<9" numpy ${EXTRA_PACKAGES}

# The %session / %vfolder magics and widgets, loaded at every kernel start: the kernel side
# alone (standard library, IPython, ipywidgets, tornado), none of the server's dependencies.
RUN python3 -m pip install --no-deps jupyter-gpu-sessions

# Where the provisioner mounts the kernel's $HOME (a tmpfs) and vfolders.
RUN mkdir -p /home/work && chmod 1777 /home/work
