"""The document's examples: real requests and the answers the bundled model (EfficientNet-Lite0, as
`make convert` exports it) gave to them. tests/serving/test_openapi.py sends each request example to a
server and compares its answer with the documented one.

The images are centre crops of data/images/coffee.png and chelsea.png, resized to 64x64 and saved as
JPEG (quality 75 and 60): small enough for a document, still classified as what they show.
"""

ESPRESSO = (
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAgGBgcGBQgHBwcJCQgKDBQNDAsLDBkSEw8UHRofHh0aHBwgJC4nICIsIxwcKDcpLDAxNDQ0Hyc5"
    "PTgyPC4zNDL/2wBDAQkJCQwLDBgNDRgyIRwhMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjL/wAAR"
    "CABAAEADASIAAhEBAxEB/8QAHwAAAQUBAQEBAQEAAAAAAAAAAAECAwQFBgcICQoL/8QAtRAAAgEDAwIEAwUFBAQAAAF9AQIDAAQRBRIhMUEG"
    "E1FhByJxFDKBkaEII0KxwRVS0fAkM2JyggkKFhcYGRolJicoKSo0NTY3ODk6Q0RFRkdISUpTVFVWV1hZWmNkZWZnaGlqc3R1dnd4eXqDhIWG"
    "h4iJipKTlJWWl5iZmqKjpKWmp6ipqrKztLW2t7i5usLDxMXGx8jJytLT1NXW19jZ2uHi4+Tl5ufo6erx8vP09fb3+Pn6/8QAHwEAAwEBAQEB"
    "AQEBAQAAAAAAAAECAwQFBgcICQoL/8QAtREAAgECBAQDBAcFBAQAAQJ3AAECAxEEBSExBhJBUQdhcRMiMoEIFEKRobHBCSMzUvAVYnLRChYk"
    "NOEl8RcYGRomJygpKjU2Nzg5OkNERUZHSElKU1RVVldYWVpjZGVmZ2hpanN0dXZ3eHl6goOEhYaHiImKkpOUlZaXmJmaoqOkpaanqKmqsrO0"
    "tba3uLm6wsPExcbHyMnK0tPU1dbX2Nna4uPk5ebn6Onq8vP09fb3+Pn6/9oADAMBAAIRAxEAPwDhtK8N42y3mD32dcf410oMVvGIkRR/s9zS"
    "S3MZGICGI6t3P+ArqPh/p9vf6hPfXAEiWSB2BXjec4H4YJ/KvBvOtL3j6blhQptwWiI9N8D3l/Et5q08en2h5SNxlyP93/GtyLwn4dVQhutR"
    "lxwCNij8BiodR1aW9u3nkf5c/KPQVUXW1hbBlT8TV89OOljlftpa3+40ZfA9jMpOnakVlxwl0gGf+BD/AArmL/Tr3Srr7LeW7RNj5e4b3B7i"
    "uts9YhmA3kD/AGgcitmW2h12xfTrkgtjdBL1KN6j+tN0qdRe7owjiKlN+/qjzIlox8uGJOPpViEHglqt32mR6fIkWSZOSwJ/X+dZ07KCMEfT"
    "Fc3K1KzO1SUo8yOWnmxJtQEL2z3Fd78MLqOT+2dJDATXNuJYge5GQR+orzkEt1yT2qzHcX+hajbX1sxhuYWBUkdM9Mj0PQj0Nb03aWp0Ymnz"
    "0XBHQX8d9qd28MW6KGMlTnjkdafF4Ui25fezepcj+VdVpWv6F4vO6KWLTNb/AOW9nOdqu3cox4P86vz6JqUDYe0lI9VXcP0rkrQrwei07o5Y"
    "VoNcr0fZnFjRbnTyZrGdzt5aKQ5yPY9/oa7Xwjdy3V3AhBG3JIP8PqKWDRL6UFmtnjQDl5PkUfUmuc1/xhpnh3Tr3TtBuFvNSkQrcXcJzHAC"
    "MbVPdj7dOSemK1wqquXNJWRjXlCa5I6sp6hrseseJL6MFVAuGS2kB4cKcYb6kEg++KhVRI2+RSGz0PrXHwApGijjaBzXV2+opcW8ckgzKMBz"
    "6kd/x/nTk7yud1Sh7OC5ehy0FwLYvIAN4Hyk/wAJ9frWTqGsPGoI+c9w/OR6GreoSeZMxQARn5lA9DXN34PmgHgHFdNGCctQxNRxg2i7LM95"
    "brPHC5TJIZvvgDt/tfWrFn4u16zUpba9f2+D9wTuMfhU+oazLa6H/ZtpL+5nIcRhBlMcZ3Y9PQ/WuQwVJ6100o8yvsediJ8jUd+52Bv9a8QR"
    "SvfavqOoQQjdLGJWIA9yxAA9+afDeywrNYfZIbSNf3bRZy33g2R652jLentUXgOwt9RvZzfzyJa25jO1E3E7mxj1BOOO2etXvG+nW9tfS3Np"
    "BcWkRb/RlnYeZIMjBCjkDGevBpyhrZmEa9mmlsTJggGtbTGRQ2/pgkZrJtAPs0ZJJfaN4xjB71KlwhvGhGR5SjLDsx7flXm8t5WPfrzXsb9z"
    "mdG1OLb/AGXqb+VsJWGdh9w/3W9v5VNqmlyRnbIuCRlWByrD1B6EV1/xI+HkqGTW9LjJU/8AHxDjkH+8PrXnNjrmoaZE1qds1sTzBOu5R9P7"
    "p+legoc/vw37Hi08VyR9nVV49GVJGkicruPAxzzioi7Eknv7Vfgk0uWYvcNcwqf7qh8H8xxV8Q6E4yupAezQOD+ma2c+XdMyVNT1UkvmVPD+"
    "sXeg6mt7bQpN8pR43BwwPuOQR1BHStZHudWvGu7iOUvJ96W4k3uef4fSoVvdAs1+SeadvSOHH6saqXXiaVhssYBAOm9juf8AwFZSdSfwxt5s"
    "2hHDUfenO/kjf1DUotJgWMbXupB8kQ/h929B/OptEik8rcxDTyZcs3Wub0XTJ7288yRWkkb5mZznHufX2Fd/p9pFbRPIJSzj5FH4cmuecY01"
    "yrc1dedeXM9F0R//2Q=="
)

CAT = (
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAA0JCgsKCA0LCgsODg0PEyAVExISEyccHhcgLikxMC4pLSwzOko+MzZGNywtQFdBRkxOUlNSMj5a"
    "YVpQYEpRUk//2wBDAQ4ODhMREyYVFSZPNS01T09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT09PT0//wAAR"
    "CABAAEADASIAAhEBAxEB/8QAHwAAAQUBAQEBAQEAAAAAAAAAAAECAwQFBgcICQoL/8QAtRAAAgEDAwIEAwUFBAQAAAF9AQIDAAQRBRIhMUEG"
    "E1FhByJxFDKBkaEII0KxwRVS0fAkM2JyggkKFhcYGRolJicoKSo0NTY3ODk6Q0RFRkdISUpTVFVWV1hZWmNkZWZnaGlqc3R1dnd4eXqDhIWG"
    "h4iJipKTlJWWl5iZmqKjpKWmp6ipqrKztLW2t7i5usLDxMXGx8jJytLT1NXW19jZ2uHi4+Tl5ufo6erx8vP09fb3+Pn6/8QAHwEAAwEBAQEB"
    "AQEBAQAAAAAAAAECAwQFBgcICQoL/8QAtREAAgECBAQDBAcFBAQAAQJ3AAECAxEEBSExBhJBUQdhcRMiMoEIFEKRobHBCSMzUvAVYnLRChYk"
    "NOEl8RcYGRomJygpKjU2Nzg5OkNERUZHSElKU1RVVldYWVpjZGVmZ2hpanN0dXZ3eHl6goOEhYaHiImKkpOUlZaXmJmaoqOkpaanqKmqsrO0"
    "tba3uLm6wsPExcbHyMnK0tPU1dbX2Nna4uPk5ebn6Onq8vP09fb3+Pn6/9oADAMBAAIRAxEAPwByOsKiBFyRzj0qrJMWbaCWY9VHGKc42/Ko"
    "GW7Y6ikEDeXsiHzNxXG2dqKkgRSWkIVu+DnFWI8YdCrDIxnqKgkikQK5AyGwT3Bqxdlkt1IO1mYDPei4rFIQl7CBlbzDFkFmGCBTLYyI++Nm"
    "8oDaVPP0P9K0bqJkkhxkGeJkbHqOc1WSMyrBCHO2SVeQewGSPzp3uKxbs3MxwWCkGrMjYO3PPuagt1VQ7AEupOcj3p82xGMsjZXHy+9OLa0G"
    "rdSjbx3asBNcNh+ccEVa1CS6thbxW7xbpmK72XOABmpr5CowigjqPY1UeRp4lichZI33ROegPcH69Kz6ldDN1DUL2zmRRcLI7DO1lHTOKv2d"
    "yuoiON18uaEhmTsR6is3ULS2N8lzcyvAyjlGUnP0I4NLpdyr+II3RWVHQp83p2q9JIzi2nqdHMVlIDjDKDtPp2pUgijhTIxsYMD70l1Hh8j0"
    "FLNIBED12oWx9BU9TQYDHFc3DM6ojYxuOPrUiwrIFDYZOxByK5W1M15q0zXYJVQdxb7oHX8OK6TSrNksoF80qrDO0j8qtKzRnfmTKd3d3LjY"
    "0DL7+lRiTAzJsGPSrEMrbvLmdcjoc9at/Zo3TBRai1zS5Wt53UbFIYf3WGazr+N1ukuAB5isCPatWSOOMgKcEc88VWliSZGPzZGRgg81m3Yp"
    "FqG488AuQTjnFJqgaGzLJ/Gu0+wrJsZfLnaPcMA8elaepy77CNVbnOD9M1KbuNpFcWluP9bcTTqMHyzhQfTJHWpZbqZ23scAdAOgpiRySf7I"
    "Xhq0orGC4jAVsHuK6KcbmMnYjuLIOvAUEdCR0ptrI8bbJzux/EFwK0XAPbNVZUBOTziqsFyG6kBB3eU/GPnXtTbJFDk7QFPYPkdPTtSyLuBz"
    "nmqrrIp+Ug/Ws/Z6l82hQ16wjsnF3a7VidsOrchc+npTtNt5J0FzO7LCnKLk/N/9apZYJbpBHJgpkEj1qyY2UANJgDsKtpC5mtCS2jVYGOch"
    "jk8EU+LakhkjLbj0GafBA8wCx8J3zWhDaRQLwMt6mnFWM27n/9k="
)

# What POST /predict and POST /predict/top?k=3 answered to {"image": ESPRESSO} and {"images": [ESPRESSO, CAT]}.
_ESPRESSO = {"class_id": 967, "confidence": 0.3541542589664459, "label": "espresso"}
_CAT = {"class_id": 285, "confidence": 0.49277815222740173, "label": "Egyptian cat"}
_ESPRESSO_TOP = [_ESPRESSO, {"class_id": 925, "confidence": 0.1688806265592575, "label": "consomme"},
                 {"class_id": 969, "confidence": 0.06124105677008629, "label": "eggnog"}]
_CAT_TOP = [_CAT, {"class_id": 281, "confidence": 0.2859944999217987, "label": "tabby"},
            {"class_id": 282, "confidence": 0.16733074188232422, "label": "tiger cat"}]
ANSWER = {**_ESPRESSO, "processing_time": 0.027559}
TOP_ANSWER = {"predictions": _ESPRESSO_TOP, "processing_time": 0.027559}
BATCH_ANSWER = {"results": [_ESPRESSO, _CAT], "count": 2, "processing_time": 0.033045}
TOP_BATCH_ANSWER = {"results": [{"predictions": _ESPRESSO_TOP}, {"predictions": _CAT_TOP}], "count": 2,
                    "processing_time": 0.030124}
