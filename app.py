"""Start the SkyMoE Geo map app: ``python app.py [--model DIR] [--quant 4bit|8bit|none] [--raster PATH]``.

See ``python app.py --help``; the code lives in the ``app`` package (app/main.py).
"""

from app.main import main

if __name__ == "__main__":
    main()
