"""The connector SPI: the one part of rostersync a connector imports.

``connector`` (the Protocol, fetch modes, plug-in loading), ``records`` (the frozen records a
connector yields), ``rows`` (records as staging rows, also built in decode workers) and
``retry`` (the HTTP retry policy); for connector authors' tests, ``testing`` (the memory
connector and the shared contract suite, which needs pytest) and ``testdata`` (the small roster
the suite expects). Kept free of imports so that a decode worker loading
``rostersync.source.rows`` loads nothing else.
"""
