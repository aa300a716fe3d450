"""How bytes reach the device: HTTPS and MQTT fetchers (TUF FetcherInterface) and
the MQTT block wire format the bridge shares.
"""
