"""The C program of ``cnnpress export --c`` on an emulated Cortex-M3 (QEMU ``mps2-an385``).

Cross-compiles each model's program with Debian's ``gcc-arm-none-eabi`` and
``libnewlib-arm-none-eabi`` (soft float, newlib-nano, semihosting: ``benchmarks/cortex_m3/``
holds the vector table, the reset handler that copies ``.data`` to RAM, the linker script for
the machine's map and the main that reads ``input.bin`` and writes ``logits.bin`` on the host),
runs it under ``qemu-system-arm`` on the first Fashion-MNIST test images and checks that the
predicted classes equal those of the same program built for the host. Records flash and RAM
from ``arm-none-eabi-size`` (of ``model.o`` and of the whole program) and the arena, and
whether they fit a small Cortex-M3 (the ``lm3s6965evb``: 256 KiB of flash, 64 KiB of SRAM).
Installs its packages itself (as root, with apt) where they are missing::

    python benchmarks/cortex_m3.py --out benchmarks/results/cortex_m3.json \\
        --files runs/compare-fmnist-slbf/slbf-100x-kd/model.cnnp

The models: the shipped fp32 ResNet-20, SLBF at 100x from it by the budget planner (untrained:
the sizes are those of a trained file) and any ``--files``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import cnnpress
from cnnpress.data import Loader, load_dataset
from cnnpress.provenance import (
    ALLOW_DIRTY_HELP,
    require_clean_or_exit,
    script_provenance,
    write_result,
)
from cnnpress.runtime import export_c
from cnnpress.runtime.c_export import RUNTIME_FILES

HARNESS = Path(__file__).parent / "cortex_m3"
PACKAGES = ["gcc-arm-none-eabi", "libnewlib-arm-none-eabi", "qemu-system-arm"]
TOOLS = ["arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm"]
M3_FLAGS = [
    "-mcpu=cortex-m3",
    "-mthumb",
    "-O2",
    "-std=c99",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-ffunction-sections",
    "-fdata-sections",
]
SMALL_M3 = {"board": "lm3s6965evb", "flash_bytes": 256 * 1024, "ram_bytes": 64 * 1024}
STORAGE = {"float_bits": 8, "fold_batchnorm": True, "entropy": True}


def have_toolchain() -> bool:
    return all(shutil.which(t) for t in TOOLS)


def install_toolchain() -> None:
    """apt-get the cross compiler, newlib and QEMU (about 0.9 GB without recommends)."""
    if have_toolchain():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        sys.exit(
            f"needs {', '.join(TOOLS)}: apt-get install --no-install-recommends "
            f"{' '.join(PACKAGES)} (as root)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def size(path: Path) -> dict[str, int]:
    line = (
        subprocess.run(
            ["arm-none-eabi-size", str(path)], capture_output=True, text=True, check=True
        )
        .stdout.splitlines()[1]
        .split()
    )
    text, data, bss = (int(v) for v in line[:3])
    return {"text": text, "data": data, "bss": bss}


def build_m3(folder: Path) -> dict[str, dict[str, int]]:
    """Cross-compile the exported program in ``folder`` into ``prog.elf``; its sizes and
    those of ``model.o`` alone."""
    for name in ("startup.c", "main_m3.c", "link.ld"):
        shutil.copyfile(HARNESS / name, folder / name)
    kernels = [n for n in RUNTIME_FILES if n.endswith(".c") and n != "main.c"]
    sources = ["startup.c", "main_m3.c", "model.c", *kernels]
    subprocess.run(
        ["arm-none-eabi-gcc", *M3_FLAGS, "-c", "model.c", "-o", "model_m3.o"],
        cwd=folder,
        check=True,
    )
    subprocess.run(
        [
            "arm-none-eabi-gcc",
            *M3_FLAGS,
            "-Wl,--gc-sections",
            "--specs=nano.specs",
            "--specs=rdimon.specs",
            "-nostartfiles",
            "-T",
            "link.ld",
            *sources,
            "-lm",
            "-o",
            "prog.elf",
        ],
        cwd=folder,
        check=True,
    )
    return {"model_o": size(folder / "model_m3.o"), "program": size(folder / "prog.elf")}


def run_m3(folder: Path, x: torch.Tensor, timeout: float) -> np.ndarray:
    """The logits of ``x`` from ``prog.elf`` under QEMU (input and output via semihosting)."""
    (folder / "input.bin").write_bytes(x.numpy().astype("<f4").tobytes())
    (folder / "logits.bin").unlink(missing_ok=True)
    cmd = [
        "timeout",
        str(int(timeout)),
        "qemu-system-arm",
        "-M",
        "mps2-an385",
        "-nographic",
        "-semihosting-config",
        "enable=on,target=native",
        "-kernel",
        "prog.elf",
    ]
    done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"QEMU ended with status {done.returncode}: {done.stderr[-500:]}")
    return np.frombuffer((folder / "logits.bin").read_bytes(), dtype="<f4").reshape(len(x), -1)


def run_host(folder: Path, x: torch.Tensor) -> np.ndarray:
    sources = [
        str(p) for p in sorted(folder.glob("*.c")) if p.name not in ("startup.c", "main_m3.c")
    ]
    subprocess.run(
        ["cc", "-std=c99", "-O2", *sources, "-lm", "-o", str(folder / "host")], check=True
    )
    done = subprocess.run(
        [str(folder / "host")],
        input=x.numpy().astype("<f4").tobytes(),
        capture_output=True,
        check=True,
    )
    return np.frombuffer(done.stdout, dtype="<f4").reshape(len(x), -1)


def measure(
    name: str,
    model: torch.nn.Module,
    x: torch.Tensor,
    labels: np.ndarray,
    folder: Path,
    timeout: float,
) -> dict:
    out = folder / name.replace("/", "_").replace(":", "_")
    info = export_c(model, out, tuple(x.shape[1:]))
    sizes = build_m3(out)
    host = run_host(out, x)
    start = time.perf_counter()
    m3 = run_m3(out, x, timeout)
    seconds = time.perf_counter() - start
    prog = sizes["program"]
    flash, ram = prog["text"] + prog["data"], prog["data"] + prog["bss"]
    row = {
        "model": name,
        "images": len(x),
        "same_class_as_host": int((m3.argmax(1) == host.argmax(1)).sum()),
        "max_abs_diff_from_host": float(np.abs(m3 - host).max()),
        "accuracy": float((m3.argmax(1) == labels).mean()),
        "qemu_seconds": round(seconds, 1),
        "arm_none_eabi_size": sizes,
        "program_flash_bytes": flash,
        "program_ram_bytes": ram,
        **{k: v for k, v in info.items() if k not in ("layers", "files")},
        "fits": {
            **SMALL_M3,
            "flash": flash <= SMALL_M3["flash_bytes"],
            "ram": ram <= SMALL_M3["ram_bytes"],
        },
    }
    print(
        f"{name}: {row['same_class_as_host']}/{len(x)} classes as on the host, flash "
        f"{flash:,} B, RAM {ram:,} B (arena {info['arena_bytes']:,}), {seconds:.0f} s in QEMU",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--fp32-images", type=int, default=100)
    parser.add_argument("--files", nargs="*", default=[], help="more .cnnp files to run")
    parser.add_argument("--timeout", type=float, default=3000, help="seconds per QEMU run")
    parser.add_argument("--out", default=None)
    parser.add_argument("--allow-dirty", action="store_true", help=ALLOW_DIRTY_HELP)
    args = parser.parse_args()
    require_clean_or_exit(args.allow_dirty or not args.out)  # a results file: clean tree
    install_toolchain()
    torch.set_num_threads(1)
    x, labels = next(iter(Loader(load_dataset("fashion-mnist", "test"), args.images, train=False)))
    labels = labels.numpy()
    fp32 = cnnpress.load("pretrained:resnet20-fmnist")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        small = cnnpress.compress(fp32, "slbf", target_ratio=100, **STORAGE)
        cnnpress.save(small, folder / "slbf-100x.cnnp")
        models = [
            (
                "slbf-100x (planner, untrained)",
                cnnpress.load(folder / "slbf-100x.cnnp"),
                args.images,
            )
        ]
        models += [(f, cnnpress.load(f), args.images) for f in args.files]
        models.append(("pretrained:resnet20-fmnist", fp32, args.fp32_images))
        for name, model, count in models:
            rows.append(measure(name, model, x[:count], labels[:count], folder, args.timeout))
    result = {
        **script_provenance(args.out, args.allow_dirty),
        "compiler": subprocess.run(
            ["arm-none-eabi-gcc", "--version"], capture_output=True, text=True, check=True
        ).stdout.splitlines()[0],
        "flags": M3_FLAGS,
        "rows": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
