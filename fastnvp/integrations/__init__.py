"""Adapters that plug fastnvp flows into other libraries.

Each adapter is its own module and imports its library only when that module is imported, so
``import fastnvp`` never needs them::

    fastnvp.integrations.sbi    conditional Real NVP as sbi's density estimator (``pip install
                                fastnvp[sbi]``): ``NPE(prior, density_estimator=realnvp_nn())``
"""
