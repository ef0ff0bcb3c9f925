"""The vote engines on any device: the precision cascade with its near-tie bands (``cascade``),
exact DSSN enumeration and Monte Carlo counting (``voting``), and measured throughput
(``throughput``)."""
