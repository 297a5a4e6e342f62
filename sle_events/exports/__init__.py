"""Exports of the study record (ODM, SDTM, FHIR, PDF), each tied to a ledger checkpoint by a signed manifest.

Above projections, ledger and audit; never imports cli, api or web. `scope` (what an export covers),
`manifest` (the signed manifest and its check), `source` (the subjects in scope, read through the projections
and folded, on worker processes), `sdtm`, `fhir`, `report` (`export_sdtm`, `export_fhir`, `export_report`:
functions that write into a given folder or file, for the CLI and the HTTP API alike).
"""
