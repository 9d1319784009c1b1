"""``python -m generation`` = ``pstudy generate`` (handy under ``torchrun -m generation``)."""

from generation.cli import generate

if __name__ == "__main__":
    generate(prog_name="python -m generation")
