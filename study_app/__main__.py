"""``python -m study_app`` is the same as the ``pstudy`` console script."""

from study_app.cli import main

if __name__ == "__main__":
    main(prog_name="pstudy")
