"""The web page's gallery: a dataset folder's images and their captions, from every source.

Knows files and captions only; :mod:`vision_server.api.gallery` puts it on HTTP and the engine
makes fresh captions. Every path a client names is checked by :mod:`.paths` before any file is
touched.
"""
