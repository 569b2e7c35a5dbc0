"""The end-to-end demo and the recipe it shares with experiments: corpora -> prepared sources -> `mixer serve`
-> a mixture job -> training over HTTP. It sits on top of both sides (service and client), like the `mixer`
command; nothing imports it but experiments."""
