"""The operator's dashboard: the night at a glance in a browser, served by the API's
server at ``/`` (:func:`obsflow.dashboard.routes.install`, called by
:func:`obsflow.api.create_app`).

``routes.py`` holds the pages, ``views.py`` the typed view models they render (read
from the catalog's stores and the one status snapshot, through the API's own access
rule), ``session.py`` signing in with a token, the session cookie and its CSRF token;
``templates/`` the Jinja2 templates, ``static/`` htmx, its SSE extension and the style
sheet, all served from here (no outside network).
"""
