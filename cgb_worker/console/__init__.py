"""The operations console (``cgb-worker console``): an aiohttp app over the same Redis as the workers and the
receiver, server-rendered, readable without JavaScript. :mod:`.auth` guards it; :mod:`.app` serves its pages."""
