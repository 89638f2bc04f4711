"""The web page's static files (HTML, CSS, JavaScript modules), shipped as package data.

No build step and nothing from other sites: :mod:`vision_server.api.ui` serves these files as
they are, under a Content-Security-Policy that allows only this server's own scripts.
"""
