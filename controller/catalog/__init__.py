"""The site's catalogue as data: SKUs, scales and shelf positions as records (docs/catalogue.md).

A catalogue is read from CSV or JSON Lines (`formats`), validated all-or-nothing against the
site's topology with an error per bad row and column (`validate`), compared with the stored one
(`diff`) and kept, versioned and audited, in the journal (controller/adapters/catalog_store.py).
"""
