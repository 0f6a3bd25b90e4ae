"""`python -m pipeline`: the main job (see pipeline/driver/main.py)."""

from pipeline.driver.main import main

if __name__ == "__main__":
    main()
