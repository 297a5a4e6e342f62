"""Exports of the study record (ODM, SDTM, FHIR, PDF), each tied to a ledger checkpoint by a signed manifest.

Above projections, ledger and audit; never imports cli, api or web. `scope` (what an export covers),
`manifest` (the signed manifest and its check).
"""
