{
  "targets": [
    {
      "target_name": "iovirt_native",
      "sources": ["native/iovirt.c"],
      "defines": ["NAPI_VERSION=8", "_GNU_SOURCE"],
      "cflags_c": ["-std=gnu11", "-Wall", "-Wextra"],
      "conditions": [
        ["OS!='linux'", {
          "type": "none"
        }]
      ]
    }
  ]
}
