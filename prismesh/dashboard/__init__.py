"""The consortium dashboard: a read-only web app over a deployment's final events and its store.

``index`` reads the Coordinator's, Registry's and FinalityGadget's events incrementally into an
in-memory model (so no request rescans the chain); ``objects`` verifies stored objects and
``audits`` re-runs ``prismesh audit`` in the background; ``charts`` draws inline SVG; ``app``
serves server-rendered pages with live updates over server-sent events; ``server`` runs it.
Nothing here holds a key or sends a transaction. Only the command line imports this package.
"""
