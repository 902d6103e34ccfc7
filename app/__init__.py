"""SkyMoE Geo's analyst map app: Gradio UI, Leaflet map and event handlers (no model or geo code).

Run it with ``python app.py`` (see app/main.py for the options).
"""
